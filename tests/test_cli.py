"""The command line: the seed's terminal lines, exit codes, and one clear line for every bad input."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metaagent_ray.cli import app
from metaagent_ray.llm.fake import plan_for_query
from metaagent_ray.record import RunRecord
from tests.conftest import EXAMPLES
from tests.stand_in_server import StandInServer


def metaagent(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real command in a fresh process, as a user types it."""
    return subprocess.run([sys.executable, "-m", "metaagent_ray", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def write(tmp_path: Path, name: str, content: object) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


AGENT = {"role": "RESEARCHER", "task": "t", "depends_on": []}

BAD_PLANS = {
    "not-json.json": ("{agents: [", "not valid JSON"),
    "missing-task.json": ({"agents": [{"role": "WRITER"}]}, "agents[0].task: Field required"),
    "deps-not-list.json": ({"agents": [{**AGENT, "depends_on": "0"}]}, "agents[0].depends_on: must be a list of integers"),
    "deps-not-ints.json": ({"agents": [AGENT, {**AGENT, "depends_on": [0.5]}]}, "agents[1].depends_on[0]: must be an integer (an agent index)"),
    "unknown-role.json": (
        {"agents": [{**AGENT, "role": "WIZARD"}]},
        "agents[0].role: unknown role 'WIZARD' (roles: RESEARCHER, ANALYZER, PLANNER, WRITER, CRITIC, SYNTHESIZER, COORDINATOR)",
    ),
    "no-agents.json": ({"description": "empty", "agents": []}, "agents: the plan has no agents"),
    "not-an-object.json": ([AGENT], "the plan must be a JSON object"),
    "too-many.json": ({"agents": [AGENT] * 65}, "the plan has 65 agents, more than --max-agents 64"),
    "misspelt-key.json": (
        {"agents": [AGENT, {"role": "WRITER", "task": "w", "depend_on": [0]}]},
        "agents[1]: unknown key 'depend_on' (did you mean 'depends_on'?)",
    ),
    "unknown-plan-key.json": ({"agents": [AGENT], "steps": []}, "unknown key 'steps' (keys: description, agents, depth)"),
}


@pytest.mark.parametrize("name", sorted(BAD_PLANS))
def test_bad_plan_files_get_one_line_and_exit_2(tmp_path: Path, name: str):
    content, expected = BAD_PLANS[name]
    path = write(tmp_path, name, content)
    result = metaagent("exec", str(path), "--llm", "fake", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: ") and expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing half-written


def test_missing_plan_file_and_bad_options(tmp_path: Path):
    missing = metaagent("exec", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "cannot read the plan file" in missing.stderr
    plan = str(EXAMPLES / "parallel_research.json")
    cases = [
        (["--llm", "nonsense"], "unknown LLM backend 'nonsense'"),
        (["--llm", "fake", "--fake-latency", "soon"], "--fake-latency soon: not a number and not a readable file"),
        (["--llm", "fake", "--fake-fail", "x:y"], "--fake-fail x:y: cannot read"),
        (["--llm", "ollama", "--fake-fail", "3"], "--fake-latency, --fake-fail and --fake-plan apply to --llm fake only"),
        (["--llm", "fake", "--prompt-style", "document"], "--openai-base-url and --prompt-style apply to --llm openai only"),
        (["--llm", "openai", "--prompt-style", "plain"], "openai backend: option prompt_style: Input should be 'auto', 'chat' or 'document'"),
        (["--llm", "fake", "--on-failure", "maybe"], "on_failure: Input should be 'continue' or 'stop'"),
    ]
    with ThreadPoolExecutor() as processes:  # each is a cold process that mostly imports: side by side
        results = list(processes.map(lambda case: metaagent("exec", plan, *case[0], cwd=tmp_path), cases))
    for (_, expected), result in zip(cases, results):
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr


def test_max_agents_option_is_honoured(tmp_path: Path):
    result = metaagent("exec", str(EXAMPLES / "software_architecture.json"), "--max-agents", "10", cwd=tmp_path)
    assert result.returncode == 2 and "the plan has 15 agents, more than --max-agents 10" in result.stderr


@pytest.mark.usefixtures("ray_session")
def test_exec_prints_the_seed_lines_and_the_final_output(tmp_path: Path):
    record_path = tmp_path / "record.json"
    result = CliRunner().invoke(
        app,
        ["exec", str(EXAMPLES / "parallel_research.json"), "--llm", "fake", "--run-dir", str(tmp_path / "run"), "--record", str(record_path)],
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "🔀 Execution layers (parallel groups): 3" in out
    assert "  Layer 0: 3 agents in parallel - ['RESEARCHER', 'RESEARCHER', 'RESEARCHER']" in out
    assert "  Layer 1: 1 agents in parallel - ['ANALYZER']" in out
    for agent, role in enumerate(["RESEARCHER"] * 3 + ["ANALYZER", "SYNTHESIZER"]):
        assert f"⚡ [PARALLEL] Agent {agent}: {role}" in out
        assert f"✅ [PARALLEL] Agent {agent} completed: {role}" in out
        assert out.index(f"⚡ [PARALLEL] Agent {agent}: {role}") < out.index(f"✅ [PARALLEL] Agent {agent} completed: {role}")
    assert result.stdout.rstrip().endswith("[SYNTHESIZER] agent 4: Create a comparison report\nInputs from agents: 3")
    assert json.loads(record_path.read_text())["status"] == "ok"


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize(
    ("policy", "after_the_failure"),
    [
        ([], ["ok", "ok"]),  # continue, the default: the analyzer and the synthesizer run without agent 2
        (["--on-failure", "stop"], ["skipped", "skipped"]),  # everything downstream of agent 2 is skipped
    ],
)
def test_failed_agents_exit_1_and_keep_what_finished(tmp_path: Path, policy: list[str], after_the_failure: list[str]):
    result = CliRunner().invoke(
        app, ["exec", str(EXAMPLES / "parallel_research.json"), "--llm", "fake", "--fake-fail", "2", *policy, "--run-dir", str(tmp_path / "run")]
    )
    assert result.exit_code == 1
    assert "❌ [PARALLEL] Agent 2 failed: RESEARCHER" in result.output
    record = RunRecord.model_validate_json((tmp_path / "run" / "record.json").read_text())
    assert [agent.status for agent in record.agents] == ["ok", "ok", "failed", *after_the_failure]
    assert (tmp_path / "run" / "agents" / "00-researcher.md").exists()
    if policy:
        assert "❌ [PARALLEL] Agent 3 skipped: ANALYZER - skipped: input from agent(s) [2] is missing (--on-failure stop)" in result.output
        assert record.agents[3].started_at is None and record.agents[4].started_at is None  # no LLM call for them
        assert record.settings["on_failure"] == "stop"  # what a resume of this run goes on with


@pytest.mark.usefixtures("ray_session")
def test_quiet_prints_only_the_final_output(tmp_path: Path):
    result = CliRunner().invoke(app, ["exec", str(EXAMPLES / "parallel_research.json"), "-q", "--llm", "fake", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0
    assert "PARALLEL" not in result.output and "Inputs from agents: 3" in result.output


QUERY = "Compare Python, Rust, and Go for web development"


def test_plan_prints_the_coordinators_plan_and_its_layers_and_runs_nothing(tmp_path: Path):
    result = metaagent("plan", QUERY, "--llm", "fake", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == plan_for_query(QUERY)  # stdout holds the plan alone, as a file would
    assert "🔀 Execution layers (parallel groups): 3" in result.stderr
    assert "  Layer 0: 3 agents in parallel - ['RESEARCHER', 'RESEARCHER', 'RESEARCHER']" in result.stderr
    assert "Agent 0" not in result.stdout + result.stderr and not (tmp_path / "runs").exists()


@pytest.mark.usefixtures("ray_session")
def test_plan_saves_the_plan_and_the_command_it_prints_runs_it(tmp_path: Path):
    saved = tmp_path / "plans" / "plan.json"
    result = metaagent("plan", QUERY, "--llm", "fake", "-o", str(saved), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(saved.read_text()) == plan_for_query(QUERY)
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "🔀 Execution layers (parallel groups): 3"
    assert lines[-1] == f"💾 Plan saved to {saved}; run it with: metaagent exec {saved} --query {shlex.quote(QUERY)}"
    command = shlex.split(lines[-1].split("run it with: metaagent ", 1)[1])
    run = CliRunner().invoke(app, [*command, "--llm", "fake", "--run-dir", str(tmp_path / "run")])
    assert run.exit_code == 0, run.output
    record = RunRecord.model_validate_json((tmp_path / "run" / "record.json").read_text())
    assert record.query == QUERY and record.plan.model_dump(exclude={"depth"}) == plan_for_query(QUERY)


@pytest.mark.usefixtures("ray_session")
def test_max_tokens_is_every_agents_answer_budget(tmp_path: Path):
    with StandInServer(api="openai", responder=lambda body: "one two three four five six seven eight") as server:
        result = CliRunner().invoke(app, [
            "exec", str(EXAMPLES / "parallel_research.json"), "--llm", "openai", "--openai-base-url", server.base_url,
            "--model", "test-model", "--max-tokens", "3", "--run-dir", str(tmp_path / "run"),
        ])
        bodies = server.chat_bodies()
    assert result.exit_code == 0, result.output
    assert len(bodies) == 5 and {body["max_tokens"] for body in bodies} == {3}  # every role, whatever its own budget
    record = RunRecord.model_validate_json((tmp_path / "run" / "record.json").read_text())
    assert {(agent.output, agent.finish_reason) for agent in record.agents} == {("one two three", "length")}


def test_version_names_the_installed_distribution() -> None:
    from importlib.metadata import version

    result = metaagent("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"metaagent-ray {version('metaagent-ray')}"
