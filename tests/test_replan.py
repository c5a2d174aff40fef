"""Replanning (`--replan N`): after the agents finish, the joiner reads their results and finishes or plans
new agents, which run as the next round; the record, the views and resume know the rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metaagent_ray import Event, MetaAgent, Notice, RoundStarted
from metaagent_ray.coordinator import parse_decision
from metaagent_ray.plan import ExecutionPlan
from metaagent_ray.record import RunRecord
from tests.adversarial import invoke
from tests.test_adversarial_signals import Terminal
from tests.test_run_endings import load, until

QUERY = "Compare Python and Rust for web development"  # the fake plans 0, 1 (researchers) -> 2 (analyzer) -> 3 (synthesizer)
ROUND_ONE, ROUND_TWO = [0, 1, 2, 3], [4, 5, 6]  # agent 1 fails; the fake joiner replaces it, 2 and 3 with 4, 5 and 6


@pytest.mark.usefixtures("ray_session")
def test_a_failed_agent_is_replaced_in_round_two_and_the_final_answer_uses_the_replacement(tmp_path: Path):
    run_dir = tmp_path / "run"
    result = invoke("run", QUERY, "--llm", "fake", "--fake-fail", "1", "--replan", "1", "--retries", "0", "--run-dir", str(run_dir))
    assert result.exit_code == 0, result.output
    assert "🔁 Round 2: joiner replanned: agent 1 failed or answered nothing, 3 new agents" in result.output
    assert "Traceback" not in result.output
    record = load(run_dir)
    assert [round_.agents for round_ in record.rounds] == [ROUND_ONE, ROUND_TWO]
    first, second = record.rounds
    assert first.joiner is not None and first.joiner.decision == "replan" and first.joiner.reason
    assert second.joiner is None  # --replan 1: no round left to add, so the joiner is not asked again
    agents = record.agents
    assert agents[1].status == "failed" and "(replaces agent 1)" in agents[4].task
    assert agents[4].depends_on == [] and agents[5].depends_on == [0, 4] and agents[6].depends_on == [5]
    assert agents[5].inputs_from == [0, 4]  # agent 0 reused from round one, the replacement's output
    assert record.final_output == agents[6].output and "agent 6" in record.final_output
    assert record.status == "ok"  # round one's failure was routed around
    assert agents[0].attempts == 1  # reused in round two, never run again
    assert "round 2" in (run_dir / "graph.svg").read_text() and "round 2" in (run_dir / "graph.mmd").read_text()
    report = (run_dir / "report.html").read_text()
    assert "Round 2" in report and "the joiner decided to <b>replan</b>" in report
    assert "Joiner after round 1" in (run_dir / "timeline.svg").read_text()
    assert len(json.loads((run_dir / "plan.json").read_text())["agents"]) == 7


@pytest.mark.usefixtures("ray_session")
def test_without_a_failure_the_joiner_finishes_and_without_replan_it_is_never_asked():
    events: list[Event] = []
    record = MetaAgent(llm="fake", replan=2, on_event=events.append).run(QUERY, save=False)
    assert len(record.rounds) == 1 and record.rounds[0].joiner is not None
    assert record.rounds[0].joiner.decision == "finish" and record.status == "ok"
    assert any(isinstance(event, Notice) and event.text.startswith("🔁 Joiner finished after round 1") for event in events)
    plain = MetaAgent(llm="fake").run(QUERY, save=False)
    assert len(plain.rounds) == 1 and plain.rounds[0].joiner is None


@pytest.mark.usefixtures("ray_session")
def test_bad_joiner_output_is_one_warning_and_the_run_finishes_as_it_is(tmp_path: Path):
    run_dir = tmp_path / "run"
    result = invoke(
        "run", QUERY, "--llm", "fake", "--fake-fail", "1,joiner:garbage", "--replan", "1", "--retries", "0", "--run-dir", str(run_dir)
    )
    assert result.exit_code == 1, result.output  # agent 1 failed, and nothing replaced it
    assert "Traceback" not in result.output
    warnings = [line for line in result.output.splitlines() if "joiner gave no valid decision" in line]
    assert len(warnings) == 1 and warnings[0].startswith("⚠️") and warnings[0].endswith("the run finishes as it is")
    record = load(run_dir)
    assert len(record.rounds) == 1 and record.status == "failed" and record.final_output == record.agents[3].output
    joiner = record.rounds[0].joiner
    assert joiner is not None and joiner.decision is None and joiner.attempts == 2 and len(joiner.errors) == 2
    assert warnings[0] in record.warnings


def test_ctrl_c_in_round_two_then_resume_finishes_round_two_without_rerunning_round_one(tmp_path: Path, latency_file, ray_cluster):
    latency = latency_file({"default": 0.05, "4": 60.0})  # round two's first agent is slow
    run_dir = tmp_path / "run"
    terminal = Terminal(
        "run", QUERY, "--llm", "fake", "--fake-fail", "1", "--replan", "1", "--retries", "0", "--fake-latency", latency,
        "--run-dir", str(run_dir), "--address", ray_cluster.address,
    )  # fmt: skip
    until(lambda: (run_dir / "record.json").exists() and len(load(run_dir).rounds) == 2, "started round two")
    terminal.type(b"\x03")
    code, output = terminal.wait()
    assert code == 130 and "Traceback" not in output, output[-3000:]
    interrupted = load(run_dir)
    assert interrupted.status == "interrupted" and [round_.agents for round_ in interrupted.rounds] == [ROUND_ONE, ROUND_TWO]
    assert [agent.status for agent in interrupted.agents] == ["ok", "failed", "ok", "ok", "pending", "pending", "pending"]
    round_one = [interrupted.agents[agent] for agent in ROUND_ONE]

    resumed = invoke("resume", str(run_dir), "--llm", "fake", "--fake-latency", "0")
    assert resumed.exit_code == 0, resumed.output
    assert "re-running agents [4, 5, 6], reusing [0, 1, 2, 3]" in resumed.output
    record = load(run_dir)
    assert record.status == "ok" and [round_.agents for round_ in record.rounds] == [ROUND_ONE, ROUND_TWO]
    for before in round_one:  # kept as they were: not run again
        after = record.agents[before.id]
        assert (after.status, after.attempts, after.started_at, after.finished_at) == (
            before.status, before.attempts, before.started_at, before.finished_at
        )  # fmt: skip
    assert [record.agents[agent].status for agent in ROUND_TWO] == ["ok", "ok", "ok"]
    assert record.final_output == record.agents[6].output and record.agents[5].inputs_from == [0, 4]


PLAN = ExecutionPlan.model_validate(
    {"agents": [{"role": "RESEARCHER", "task": "a"}, {"role": "SYNTHESIZER", "task": "b", "depends_on": [0]}]}
)


def test_a_replan_numbers_new_agents_after_the_old_and_drops_dependencies_on_no_earlier_agent():
    answer = {
        "decision": "replan",
        "reason": "b needs more",
        "agents": [{"role": "RESEARCHER", "task": "c", "depends_on": [0, 3, 2]}, {"role": "WRITER", "task": "d", "depends_on": [1, 2]}],
    }
    decision, plan = parse_decision(json.dumps(answer), PLAN, max_agents=4, max_total_agents=10)
    assert decision.reason == "b needs more" and plan is not None
    assert [agent.depends_on for agent in plan.agents] == [[], [0], [0], [1, 2]]
    assert plan.warnings == ["Agent 2: dropped dependencies 3 (no such agent), 2 (itself): a new agent depends only on agents before it"]


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ('{"decision": "replan", "reason": "x", "agents": []}', "a replan must add at least one agent"),
        ('{"decision": "maybe", "reason": "x", "agents": []}', "decision"),
        ("Looks done {", "not valid JSON"),
        ("[]", "the decision must be a JSON object"),
        ('{"decision": "replan", "reason": "x", "agents": [' + ", ".join(['{"role": "WRITER", "task": "t"}'] * 9) + "]}", "--max-total-agents 10"),
    ],
)
def test_an_invalid_decision_is_one_line_saying_why(answer: str, why: str):
    with pytest.raises(ValueError, match=why) as error:
        parse_decision(answer, PLAN, max_agents=9, max_total_agents=10)
    assert "\n" not in str(error.value)


def test_a_record_written_before_rounds_loads_as_one_round():
    record = RunRecord.start(PLAN, "q").model_dump(mode="json")
    del record["rounds"]
    loaded = RunRecord.model_validate(record)
    assert [round_.agents for round_ in loaded.rounds] == [[0, 1]] and loaded.rounds[0].joiner is None


def test_a_round_started_event_is_a_plain_line():
    from metaagent_ray.console import ConsoleView

    lines: list[str] = []
    view = ConsoleView()
    view._print = lines.append  # type: ignore[method-assign]
    plan = ExecutionPlan.model_validate({"agents": [*PLAN.model_dump()["agents"], {"role": "WRITER", "task": "c", "depends_on": [1]}]})
    view(RoundStarted(number=2, reason="b was thin", plan=plan, layers=plan.get_execution_layers(), added=[2]))
    assert lines == ["🔁 Round 2: joiner replanned: b was thin, 1 new agents", "  Agent 2: WRITER - c (depends on [1])"]
