"""Agents start while the coordinator still writes the plan, and the finished plan decides what is kept."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaagent_ray import MetaAgent, PlanReady
from metaagent_ray.plan import ExecutionPlan
from metaagent_ray.plan_stream import AgentObjects, StreamedPlan
from metaagent_ray.record import RunRecord
from tests.conftest import EXAMPLES

PLAN = {
    "description": "two researchers, then analysis and a synthesis",
    "agents": [
        {"role": "RESEARCHER", "task": 'Research {A}, with "quotes" and [brackets]', "depends_on": []},
        {"role": "RESEARCHER", "task": "Research B", "depends_on": [3]},  # a forward reference
        {"role": "ANALYZER", "task": "Compare", "depends_on": [0, 0, 2]},  # repeated and itself: cleaned
        {"role": "RESEARCHER", "task": "Research C", "depends_on": []},
        {"role": "SYNTHESIZER", "task": "Write", "depends_on": [1, 2, 9]},  # no agent 9: dropped at the end
    ],
}


def pieces(text: str, size: int) -> list[str]:
    return [text[start : start + size] for start in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 3, 17, 10_000])
def test_agent_objects_come_out_whole_however_the_text_is_cut(size: int):
    scanner = AgentObjects()
    found = [item for piece in pieces(json.dumps(PLAN, indent=1), size) for item in scanner.feed(piece)]
    assert found == PLAN["agents"]


def test_an_agent_starts_once_everything_it_depends_on_has_started():
    streamed = StreamedPlan(max_agents=64)
    started: list[int] = []
    for piece in pieces(json.dumps(PLAN), 5):
        started += [agent.agent_id for agent in streamed.feed(piece)]
    assert started == [0, 2, 3, 1]  # 1 waits for 3, which is written after it; 4 names an agent that never comes
    plan = ExecutionPlan.model_validate(PLAN)
    assert streamed.disagreement(plan) is None
    for index in started:  # each started agent is exactly as the cleaned plan has it
        assert streamed.started[index] == plan.agents[index]
    assert streamed.layer_of == {0: 0, 2: 1, 3: 0, 1: 1} and all(streamed.layer_of[i] == plan.layer_of()[i] for i in started)


def test_agents_on_a_cycle_never_start_and_the_finished_plan_sets_the_rest_aside():
    cyclic = {
        "agents": [
            {"role": "RESEARCHER", "task": "a", "depends_on": []},
            *PLAN["agents"][1:3],
            {"role": "CRITIC", "task": "c", "depends_on": [1]},
        ]
    }
    streamed = StreamedPlan(max_agents=64)
    started = [agent.agent_id for agent in streamed.feed(json.dumps(cyclic))]
    assert started == [0, 2]  # 1 and 3 wait on each other
    assert streamed.disagreement(ExecutionPlan.model_validate(cyclic)) == "the finished plan has a cycle"


def test_an_invalid_agent_spoils_the_stream_at_once():
    bad = {"agents": [PLAN["agents"][0], {"role": "WIZARD", "task": "x", "depends_on": []}, PLAN["agents"][3]]}
    streamed = StreamedPlan(max_agents=64)
    assert [agent.agent_id for piece in pieces(json.dumps(bad), 5) for agent in streamed.feed(piece)] == [0]
    assert streamed.spoiled and "agent 1 is not valid" in streamed.spoiled
    too_many = StreamedPlan(max_agents=1)
    assert [agent.agent_id for piece in pieces(json.dumps(PLAN), 5) for agent in too_many.feed(piece)] == [0]
    assert too_many.spoiled == "the plan has 2 agents, more than --max-agents 1"
    assert StreamedPlan(max_agents=64).feed(json.dumps(bad)) == []  # known to be spoiled before anything started


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(min_value=0, max_value=11), max_size=4), min_size=1, max_size=12))
def test_a_plan_that_arrives_at_once_starts_every_agent_with_the_whole_plans_layer_and_priority(draws: list[list[int]]):
    data = {"agents": [{"role": "RESEARCHER", "task": "t", "depends_on": [d for d in deps if d < i]} for i, deps in enumerate(draws)]}
    plan = ExecutionPlan.model_validate(data)
    ready = {agent.agent_id: agent for agent in StreamedPlan(max_agents=64).feed(json.dumps(data))}
    assert sorted(ready) == list(range(len(plan.agents)))
    assert {i: agent.layer for i, agent in ready.items()} == plan.layer_of()
    assert {i: agent.priority for i, agent in ready.items()} == plan.remaining_path()


def plan_file(tmp_path: Path, plan: dict) -> str:
    path = tmp_path / "coordinator_answer.json"
    path.write_text(json.dumps(plan, indent=1))
    return str(path)


def comparable(record: RunRecord) -> dict:
    """A record without its times, nodes and the streaming facts."""
    data = record.model_dump(exclude={"run_dir", "started_at", "finished_at", "ray_started_at", "ray_ready_at", "coordinator"})
    for agent in data["agents"]:
        for key in ("submitted_at", "started_at", "finished_at", "node", "output_file", "llm_ms"):
            agent.pop(key)
    return data


@pytest.mark.usefixtures("ray_session")
def test_streamed_and_whole_plans_give_the_same_record(tmp_path: Path, latency_file):
    options = {"plan": plan_file(tmp_path, PLAN), "latency": latency_file({"coordinator": 1.0, "default": 0.2})}
    records = {}
    for stream_plan in (True, False):
        events: list = []
        meta = MetaAgent(llm="fake", llm_options=options, on_event=events.append, stream_plan=stream_plan)
        records[stream_plan] = meta.run("Compare A, B and C", run_dir=tmp_path / f"run-{stream_plan}")
        assert any(isinstance(event, PlanReady) for event in events)
    streamed, whole = records[True], records[False]
    assert comparable(streamed) == comparable(whole)
    assert streamed.status == "ok" and streamed.warnings == whole.warnings and any("dropped dependencies" in w for w in streamed.warnings)
    coordinator = streamed.coordinator
    assert coordinator.streamed and coordinator.started_early == [0, 1, 2, 3] and coordinator.set_aside is None  # 4 names a missing agent
    early = streamed.agents[0]
    assert early.submitted_at < coordinator.finished_at < streamed.agents[4].submitted_at  # handed to Ray while the plan was written
    assert not whole.coordinator.streamed and all(agent.started_at > whole.coordinator.finished_at for agent in whole.agents)


@pytest.mark.usefixtures("ray_session")
def test_a_late_cycle_falls_back_to_sequential_and_keeps_nothing_from_the_early_start(tmp_path: Path, latency_file):
    cyclic = {
        "description": "a cycle at the end",
        "agents": [
            {"role": "RESEARCHER", "task": "first", "depends_on": []},
            {"role": "RESEARCHER", "task": "second", "depends_on": []},
            {"role": "ANALYZER", "task": "third", "depends_on": [3]},
            {"role": "CRITIC", "task": "fourth", "depends_on": [2]},
        ],
    }
    events: list = []
    options = {"plan": plan_file(tmp_path, cyclic), "latency": latency_file({"coordinator": 1.0, "default": 0.1})}
    record = MetaAgent(llm="fake", llm_options=options, on_event=events.append).run("q", run_dir=tmp_path / "run")

    assert record.status == "ok"
    assert record.coordinator.started_early == [0, 1] and record.coordinator.set_aside == "the finished plan has a cycle"
    set_aside = next(warning for warning in record.warnings if "set aside" in warning)
    assert "2 agents started while the coordinator wrote its plan were cancelled and set aside" in set_aside
    shown = next(event for event in events if isinstance(event, PlanReady)).plan.warnings  # what the terminal prints
    assert any("Cycle detected" in warning for warning in shown) and set_aside in shown
    for agent in record.agents:  # sequential: each ran after the plan, with every earlier agent's output
        assert agent.started_at > record.coordinator.finished_at
        assert agent.inputs_from == list(range(agent.id))
        assert agent.output.endswith("Inputs from agents: " + (", ".join(map(str, range(agent.id))) or "none"))


@pytest.mark.usefixtures("ray_session")
def test_a_plan_that_fails_validation_mid_stream_cancels_what_it_started(tmp_path: Path, latency_file):
    broken = {
        "description": "agent 3 has no such role",
        "agents": [
            {"role": "RESEARCHER", "task": "first", "depends_on": []},
            {"role": "RESEARCHER", "task": "second", "depends_on": []},
            {"role": "ANALYZER", "task": "takes forever", "depends_on": [0]},
            {"role": "WIZARD", "task": "bad", "depends_on": []},
        ],
    }
    # Agent 2 would take 10 minutes: the run ends in seconds only because it was cancelled.
    options = {"plan": plan_file(tmp_path, broken), "latency": latency_file({"coordinator": 1.0, "default": 0.1, "2": 600})}
    record = MetaAgent(llm="fake", llm_options=options).run("q", run_dir=tmp_path / "run")

    coordinator = record.coordinator
    assert coordinator.fallback and coordinator.started_early == [0, 1, 2] and "agent 3 is not valid" in coordinator.set_aside
    assert record.status == "ok" and [agent.role for agent in record.agents] == ["RESEARCHER", "SYNTHESIZER"]
    assert all(agent.started_at > coordinator.finished_at for agent in record.agents)
    assert any("set aside" in warning for warning in record.warnings)
    assert (tmp_path / "run" / "final.md").read_text().strip() == record.final_output.strip()


def test_the_cli_prints_agent_starts_before_the_plan_and_can_turn_streaming_off(tmp_path: Path, latency_file):
    from tests.test_cli import metaagent

    plan = str(EXAMPLES / "parallel_research.json")
    latency = latency_file({"coordinator": 6.0, "default": 0.1})  # time for the run's executor to start, two Rays starting
    command = ("run", "q", "--llm", "fake", "--fake-plan", plan, "--fake-latency", latency)
    with ThreadPoolExecutor() as processes:  # two cold runs, each with its own Ray: side by side
        streamed, whole = processes.map(lambda extra: metaagent(*command, *extra, cwd=tmp_path), [(), ("--no-stream-plan",)])
    for result in (streamed, whole):
        assert result.returncode == 0, result.stderr
    first_start = streamed.stdout.index("⚡ [PARALLEL] Agent 0")
    assert first_start < streamed.stdout.index("🔀 Execution layers")
    assert whole.stdout.index("🔀 Execution layers") < whole.stdout.index("⚡ [PARALLEL] Agent 0")
