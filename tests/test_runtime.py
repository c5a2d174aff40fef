"""Plans run on Ray as a DAG: data flow, no layer barriers, the slot cap, the record and run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from metaagent_ray import AgentFinished, AgentStarted, MetaAgent, Notice, PlanReady, RunFinished, load_plan, parse_plan
from metaagent_ray.record import RunRecord
from tests.conftest import EXAMPLES

pytestmark = pytest.mark.usefixtures("ray_session")


def max_overlap(record: RunRecord) -> int:
    """The most agents whose LLM calls were in progress at one instant."""
    edges = sorted(
        [(agent.started_at, 1) for agent in record.agents] + [(agent.finished_at, -1) for agent in record.agents],
        key=lambda edge: (edge[0], edge[1]),
    )
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_each_agent_runs_once_and_receives_exactly_its_dependencies(tmp_path: Path):
    plan = load_plan(EXAMPLES / "business_plan.json")
    events: list = []
    record = MetaAgent(llm="fake", on_event=events.append).execute(plan, "a business plan", run_dir=tmp_path / "run")

    assert record.status == "ok"
    for agent, spec in zip(record.agents, plan.agents):
        assert agent.status == "ok" and agent.attempts == 1
        assert agent.inputs_from == spec.depends_on
        inputs = ", ".join(map(str, spec.depends_on)) or "none"
        assert agent.output == f"[{spec.role.value}] agent {agent.id}: {spec.task}\nInputs from agents: {inputs}"
        assert agent.started_at <= agent.finished_at
        assert all(record.agents[dep].finished_at <= agent.started_at for dep in spec.depends_on)
        assert agent.node
    starts = [event.path.index for event in events if isinstance(event, AgentStarted)]
    finishes = [event.agent.id for event in events if isinstance(event, AgentFinished)]
    assert sorted(starts) == sorted(finishes) == list(range(9))
    assert isinstance(events[0], Notice) and events[0].text.startswith("🌐 Ray cluster at ")  # where the run runs, first
    assert isinstance(events[1], PlanReady) and isinstance(events[-1], RunFinished)
    assert record.final_output == record.agents[8].output


def test_the_agent_after_the_fast_branch_does_not_wait_for_the_slow_branch(latency_file):
    # 0 -> 1 (slow) -> 3 -> 5 ; 0 -> 2 (fast) -> 4 -> 5. Agents 3 and 4 share layer 2.
    plan = parse_plan(
        {
            "description": "diamond",
            "agents": [
                {"role": "RESEARCHER", "task": "root", "depends_on": []},
                {"role": "RESEARCHER", "task": "slow branch", "depends_on": [0]},
                {"role": "RESEARCHER", "task": "fast branch", "depends_on": [0]},
                {"role": "ANALYZER", "task": "after slow", "depends_on": [1]},
                {"role": "ANALYZER", "task": "after fast", "depends_on": [2]},
                {"role": "SYNTHESIZER", "task": "join", "depends_on": [3, 4]},
            ],
        }
    )
    assert plan.layer_of()[3] == plan.layer_of()[4]
    latency = latency_file({"default": 0.05, "1": 3.0})
    record = MetaAgent(llm="fake", llm_options={"latency": latency}).execute(plan, "diamond", save=False)
    slow, after_fast = record.agents[1], record.agents[4]
    assert after_fast.finished_at < slow.finished_at  # finished while the slow branch was still running
    assert record.agents[5].inputs_from == [3, 4]


def supervise_spans(since: float, count: int) -> list[tuple[float, float]]:
    """(start, end) of the hub's `supervise` actor tasks that Ray ran since `since`, from Ray's own timeline.

    Ray reports task events about once a second: wait (bounded) until `count` of them are there."""
    deadline = time.time() + 30
    while True:
        spans = sorted(
            (event["ts"] / 1e6, (event["ts"] + event["dur"]) / 1e6)
            for event in ray.timeline()
            if event.get("cat") == "task::RunHub.supervise" and event["ts"] / 1e6 >= since
        )
        if len(spans) >= count or time.time() > deadline:
            return spans
        time.sleep(0.5)


def test_ray_starts_an_agent_only_once_its_dependencies_results_exist():
    """The design card: each agent's Ray call takes its dependencies' ObjectRefs as arguments, so Ray
    resolves the graph. The second agent's `supervise` task begins after the first one's has ended:
    nothing of ours waited inside it."""
    chain = parse_plan({"agents": [{"role": "RESEARCHER", "task": "first"}, {"role": "WRITER", "task": "second", "depends_on": [0]}]})
    since = time.time()
    record = MetaAgent(llm="fake", llm_options={"latency": 1.0}).execute(chain, "chain", save=False)
    assert record.status == "ok"
    spans = supervise_spans(since, 2)
    assert len(spans) == 2, spans
    (_, first_ended), (second_began, _) = spans
    assert second_began >= first_ended


def test_slots_cap_concurrent_agents(latency_file):
    plan = parse_plan({"description": "wide", "agents": [{"role": "RESEARCHER", "task": f"t{i}"} for i in range(6)]})
    latency = latency_file({"default": 0.4})
    capped = MetaAgent(llm="fake", llm_options={"latency": latency}, slots=2).execute(plan, "wide", save=False)
    assert capped.slots == 2
    assert max_overlap(capped) == 2
    uncapped = MetaAgent(llm="fake", llm_options={"latency": latency}).execute(plan, "wide", save=False)
    assert max_overlap(uncapped) > 2


def test_cycle_fallback_runs_sequentially_and_passes_all_earlier_outputs():
    plan = parse_plan(
        {
            "description": "cyclic",
            "agents": [
                {"role": "RESEARCHER", "task": "a", "depends_on": [2]},
                {"role": "ANALYZER", "task": "b", "depends_on": []},
                {"role": "WRITER", "task": "c", "depends_on": [0]},
            ],
        }
    )
    record = MetaAgent(llm="fake").execute(plan, "cyclic", save=False)
    assert record.warnings[0].startswith("⚠️ Cycle detected in dependencies, falling back to sequential execution")
    assert [agent.inputs_from for agent in record.agents] == [[], [0], [0, 1]]
    assert record.layers == [[0], [1], [2]]
    assert record.agents[0].finished_at <= record.agents[1].started_at <= record.agents[1].finished_at <= record.agents[2].started_at


def test_run_directory_and_record_file(tmp_path: Path):
    plan = load_plan(EXAMPLES / "parallel_research.json")
    record = MetaAgent(llm="fake").execute(plan, "Compare", run_dir=tmp_path / "run", record_path=tmp_path / "copy.json")
    run = tmp_path / "run"
    saved = json.loads((run / "record.json").read_text())
    assert saved == json.loads((tmp_path / "copy.json").read_text())
    for key in ("query", "plan", "layers", "warnings", "final_output", "started_at", "finished_at", "agents"):
        assert key in saved
    assert saved["layers"] == [[0, 1, 2], [3], [4]]
    for key in ("id", "role", "task", "depends_on", "layer", "status", "started_at", "finished_at", "inputs_from", "output", "node", "attempts"):
        assert key in saved["agents"][0]
    assert (run / "final.md").read_text().strip() == record.final_output
    assert json.loads((run / "plan.json").read_text())["agents"][3]["depends_on"] == [0, 1, 2]
    assert sorted(path.name for path in (run / "agents").iterdir()) == [
        "00-researcher.md", "01-researcher.md", "02-researcher.md", "03-analyzer.md", "04-synthesizer.md",
    ]


def test_several_sinks_make_the_final_output_in_index_order():
    plan = parse_plan(
        {"agents": [{"role": "RESEARCHER", "task": "a"}, {"role": "WRITER", "task": "w", "depends_on": [0]}, {"role": "CRITIC", "task": "c", "depends_on": [0]}]}
    )
    record = MetaAgent(llm="fake").execute(plan, "q", save=False)
    assert record.final_output.index("## Agent 1 (WRITER)") < record.final_output.index("## Agent 2 (CRITIC)")


def test_a_failed_agent_is_recorded_and_its_dependents_still_run(tmp_path: Path):
    plan = load_plan(EXAMPLES / "parallel_research.json")
    record = MetaAgent(llm="fake", llm_options={"fail": "1"}).execute(plan, "Compare", run_dir=tmp_path / "run")
    assert record.status == "failed"
    assert record.agents[1].status == "failed" and "injected failure" in record.agents[1].error
    assert record.agents[3].status == "ok" and record.agents[3].inputs_from == [0, 2]
    saved = RunRecord.model_validate_json((tmp_path / "run" / "record.json").read_text())
    assert [agent.status for agent in saved.agents] == ["ok", "failed", "ok", "ok", "ok"]


KEPT_EXECUTORS_SCRIPT = """
from metaagent_ray import AgentStarted, MetaAgent
pids = []
with MetaAgent(llm="fake", slots=2, on_event=lambda e: isinstance(e, AgentStarted) and pids.append((str(e.path), e.pid))) as meta:
    for _ in range(2):
        meta.execute({"agents": [{"role": "RESEARCHER", "task": "t", "depends_on": []}]}, save=False)
print(pids)
"""


def test_a_process_that_started_its_ray_keeps_its_executors_for_its_next_run():
    """Embedded Ray is the process's own: the second run finds the first run's executor started (same process)."""
    import ast
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", KEPT_EXECUTORS_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (first, first_pid), (second, second_pid) = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert first == second == "0" and first_pid == second_pid != 0


def test_one_process_can_stop_its_ray_and_run_again_on_a_new_one() -> None:
    """`with MetaAgent(...)` twice in one script: the second Ray instance gets its own hub."""
    script = (
        "import sys\nfrom metaagent_ray import MetaAgent, load_plan\n"
        "for _ in range(2):\n"
        "    with MetaAgent(llm='fake', slots=2) as meta:\n"
        "        print(meta.execute(load_plan(sys.argv[1]), 'q', save=False).status)\n"
    )
    plan = str(EXAMPLES / "parallel_research.json")
    result = subprocess.run([sys.executable, "-c", script, plan], capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "ok"]
