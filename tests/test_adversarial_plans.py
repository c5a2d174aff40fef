"""Adversarial plan files: each gets one line naming the problem and exit 2 before anything runs, or,
where the plan is fine however odd, a run that finishes with everything kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from metaagent_ray import load_plan
from metaagent_ray.record import RunRecord
from tests.adversarial import TWO_AND_JOIN, invoke, only_line, write_plan

AGENT = {"role": "RESEARCHER", "task": "t", "depends_on": []}


def metaagent_process(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real command in its own process, bounded: an input that made it wait forever fails the test."""
    return subprocess.run([sys.executable, "-m", "metaagent_ray", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_a_plan_nested_100000_deep_is_one_line_not_a_recursion_error(tmp_path: Path):
    plan = write_plan(tmp_path / "deep.json", '{"agents": ' + "[" * 100_000 + "]" * 100_000 + "}")
    only_line(invoke("exec", str(plan), "--llm", "fake"), 2, f"{plan}: not a plan (its JSON nests too deeply)")


def test_a_5000_agent_plan_is_refused_by_default_naming_the_option_that_allows_it(tmp_path: Path):
    plan = write_plan(tmp_path / "many.json", {"agents": [{**AGENT, "task": f"t{index}"} for index in range(5000)]})
    only_line(invoke("exec", str(plan), "--llm", "fake"), 2, "the plan has 5000 agents, more than --max-agents 64")


def test_a_5000_agent_plan_is_read_and_layered_when_max_agents_allows_it(tmp_path: Path):
    agents = [{**AGENT, "task": f"t{index}", "depends_on": [index - 1] if index % 50 else []} for index in range(5000)]
    plan = load_plan(write_plan(tmp_path / "many.json", {"agents": agents}), max_agents=5000)
    assert len(plan.agents) == 5000 and len(plan.get_execution_layers()) == 50 and not plan.warnings


@pytest.mark.usefixtures("ray_session")
def test_a_plan_with_a_5_mb_task_runs_and_keeps_the_task_whole(tmp_path: Path):
    task = "Summarise this. " * (5_000_000 // 16)
    plan = write_plan(tmp_path / "big.json", {"agents": [{**AGENT, "task": task}]})
    result = invoke("exec", str(plan), "--llm", "fake", "--run-dir", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output[-2000:]
    record = RunRecord.model_validate_json((tmp_path / "run" / "record.json").read_text())
    assert record.status == "ok" and record.agents[0].task == task


def test_agents_with_duplicate_id_keys_are_refused_naming_the_unknown_key(tmp_path: Path):
    plan = write_plan(tmp_path / "ids.json", {"agents": [{**AGENT, "id": 0}, {**AGENT, "id": 0}]})
    only_line(invoke("exec", str(plan), "--llm", "fake"), 2, "agents[0]: unknown key 'id'", "agents[1]: unknown key 'id'")


def test_a_key_given_twice_in_one_agent_is_refused_not_silently_overwritten(tmp_path: Path):
    plan = write_plan(tmp_path / "twice.json", '{"agents": [{"role": "RESEARCHER", "task": "t", "depends_on": [], "depends_on": [0]}]}')
    only_line(invoke("exec", str(plan), "--llm", "fake"), 2, f"{plan}: the key 'depends_on' appears twice in one object")


ODD_DEPENDS_ON = {
    "a string": ('"0"', "agents[1].depends_on: must be a list of integers (agent indices), got '0'"),
    "a float": ("[0.5]", "agents[1].depends_on[0]: must be an integer (an agent index), got 0.5"),
    "a boolean": ("[true]", "agents[1].depends_on[0]: must be an integer (an agent index), got True"),
    "null": ("[null]", "agents[1].depends_on[0]: must be an integer (an agent index), got None"),
    "an object": ('{"0": 1}', "agents[1].depends_on: must be a list of integers (agent indices), got {'0': 1}"),
    "a nested list": ("[[0]]", "agents[1].depends_on[0]: must be an integer (an agent index), got [0]"),
    "NaN": ("[NaN]", "agents[1].depends_on[0]: must be an integer (an agent index), got nan"),
    "Infinity": ("[Infinity]", "agents[1].depends_on[0]: must be an integer (an agent index), got inf"),
}


@pytest.mark.parametrize("kind", sorted(ODD_DEPENDS_ON))
def test_a_depends_on_of_an_odd_type_is_one_line_naming_the_agent(tmp_path: Path, kind: str):
    value, expected = ODD_DEPENDS_ON[kind]
    text = '{"agents": [{"role": "RESEARCHER", "task": "a", "depends_on": []}, {"role": "WRITER", "task": "b", "depends_on": %s}]}' % value
    only_line(invoke("exec", str(write_plan(tmp_path / "odd.json", text)), "--llm", "fake"), 2, expected)


@pytest.mark.usefixtures("ray_session")
def test_negative_and_huge_agent_indices_are_dropped_with_a_warning_and_the_plan_runs(tmp_path: Path):
    plan = write_plan(tmp_path / "far.json", {"agents": [AGENT, {**AGENT, "depends_on": [-1, 10**30, 0]}]})
    result = invoke("exec", str(plan), "--llm", "fake", "--run-dir", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert f"Agent 1: dropped dependencies -1 (no such agent), {10**30} (no such agent)" in result.output
    assert RunRecord.model_validate_json((tmp_path / "run" / "record.json").read_text()).agents[1].inputs_from == [0]


def test_a_nan_task_is_one_line_naming_the_field(tmp_path: Path):
    plan = write_plan(tmp_path / "nan.json", '{"agents": [{"role": "RESEARCHER", "task": NaN, "depends_on": []}]}')
    only_line(invoke("exec", str(plan), "--llm", "fake"), 2, "agents[0].task: Input should be a valid string")


def test_a_task_holding_a_lone_surrogate_escape_is_one_line_naming_the_field(tmp_path: Path):
    plan = write_plan(tmp_path / "half-emoji.json", '{"agents": [{"role": "RESEARCHER", "task": "a \\ud83d b", "depends_on": []}]}')
    only_line(invoke("exec", str(plan), "--llm", "fake"), 2, "agents[0].task: not valid text (it holds a lone surrogate")


def test_a_directory_given_as_the_plan_is_one_line(tmp_path: Path):
    only_line(invoke("exec", str(tmp_path), "--llm", "fake"), 2, f"{tmp_path}: not a plan file (a directory, not a file)")


def test_dev_zero_given_as_the_plan_is_refused_at_once_not_read_forever(tmp_path: Path):
    result = metaagent_process("exec", "/dev/zero", "--llm", "fake", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: /dev/zero: not a plan file (not a regular file (a device, FIFO or socket))"]


def test_a_fifo_given_as_the_plan_is_refused_at_once_not_waited_on(tmp_path: Path):
    fifo = tmp_path / "plan.json"
    os.mkfifo(fifo)  # no one ever writes it: reading it would wait forever
    result = metaagent_process("exec", str(fifo), "--llm", "fake", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {fifo}: not a plan file (not a regular file (a device, FIFO or socket))"]
    assert not (tmp_path / "runs").exists()


def test_a_plan_that_is_fine_but_odd_runs_unicode_and_all(tmp_path: Path, ray_session):
    odd = {
        "description": "🚀 «plan» with\nnewlines",
        "agents": [{**agent, "task": f"{agent['task']} — 日本語 🚀\n<b>&amp;</b>"} for agent in TWO_AND_JOIN["agents"]],
    }
    result = invoke("exec", str(write_plan(tmp_path / "odd.json", odd)), "--llm", "fake", "--run-dir", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    record = RunRecord.model_validate_json((tmp_path / "run" / "record.json").read_text(encoding="utf-8"))
    assert record.status == "ok" and record.plan.agents[2].task.endswith("🚀\n<b>&amp;</b>")
