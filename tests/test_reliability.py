"""Failures stay contained, transient errors are retried, hung agents are cancelled, runs resume."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from metaagent_ray import AgentStarted, MetaAgent, parse_plan
from metaagent_ray.agents import AgentContext, run_agent
from metaagent_ray.cli import app
from metaagent_ray.llm import LLMConfig
from metaagent_ray.paths import AgentPath
from metaagent_ray.plan import AgentSpec, Role
from metaagent_ray.record import AgentRecord, FailureKind, RunRecord
from metaagent_ray.settings import RunSettings
from tests.conftest import EXAMPLES
from tests.test_run_endings import start, wait_for_line

pytestmark = pytest.mark.usefixtures("ray_session")

PLAN = EXAMPLES / "business_plan.json"  # 0,1,2,3 -> 4(0,1), 5(0,1) -> 6(2,4), 7(3,4) -> 8(5,6,7)


def run(fail: str, **settings) -> RunRecord:
    return MetaAgent(llm="fake", llm_options={"fail": fail}, **settings).execute(json.loads(PLAN.read_text()), "q", save=False)


def test_a_permanent_failure_is_contained_and_dependents_run_without_it():
    record = run("4")
    assert record.status == "failed"
    assert [agent.status for agent in record.agents] == ["ok"] * 4 + ["failed"] + ["ok"] * 4
    assert record.agents[4].attempts == 1 and "injected failure of agent 4" in record.agents[4].error
    assert record.agents[6].inputs_from == [2] and record.agents[7].inputs_from == [3]
    assert record.final_output == record.agents[8].output


def test_on_failure_stop_skips_everything_downstream():
    record = run("4", on_failure="stop")
    assert [agent.status for agent in record.agents] == ["ok"] * 4 + ["failed", "ok", "skipped", "skipped", "skipped"]
    assert "input from agent(s) [4] is missing" in record.agents[6].error
    assert record.agents[8].started_at is None  # skipped agents never call the LLM


def test_a_transient_failure_is_retried():
    record = run("2:1")
    assert record.status == "ok"
    assert record.agents[2].attempts == 2 and record.agents[3].attempts == 1


def test_retries_run_out():
    record = run("2:5", retries=1)
    assert record.agents[2].status == "failed" and record.agents[2].attempts == 2


def backoff_of(monkeypatch: pytest.MonkeyPatch, fail: str, retries: int, *, draw: str = "high") -> tuple[AgentRecord, list[float]]:
    """Agent 0 run in this thread against the fake backend failing as `fail` says: its record, and the
    seconds it slept between tries (time.sleep is recorded here, not slept; other threads still sleep).
    The jitter's random draws give the `high` or the `low` end of their range."""
    slept: list[float] = []
    real_sleep, this_thread = time.sleep, threading.get_ident()
    monkeypatch.setattr(time, "sleep", lambda seconds: slept.append(seconds) if threading.get_ident() == this_thread else real_sleep(seconds))
    monkeypatch.setattr(random, "uniform", (lambda low, high: high) if draw == "high" else (lambda low, high: low))
    spec = AgentSpec(role=Role.RESEARCHER, task="Research A", depends_on=[])
    llm = LLMConfig(backend="fake", options={"fail": fail})
    context = AgentContext(path=AgentPath((0,)), spec=spec, query="q", llm=llm, limits=RunSettings(retries=retries).limits())
    return run_agent(context, []), slept


def test_retries_wait_an_exponential_backoff_with_jitter(monkeypatch: pytest.MonkeyPatch):
    result, longest = backoff_of(monkeypatch, "0:6", retries=6, draw="high")
    assert result.status == "ok" and result.attempts == 7
    assert longest == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]  # at most: doubling from 0.5 s up to the cap of 8 s
    _, shortest = backoff_of(monkeypatch, "0:6", retries=6, draw="low")
    assert len(shortest) == 6 and all(short < long for short, long in zip(shortest, longest))  # a random share of it


@pytest.mark.parametrize(("fail", "retries", "attempts"), [("0", 3, 1), ("0:5", 2, 3)])
def test_no_wait_after_a_permanent_failure_or_the_last_try(monkeypatch: pytest.MonkeyPatch, fail: str, retries: int, attempts: int):
    result, slept = backoff_of(monkeypatch, fail, retries)
    assert result.status == "failed" and result.attempts == attempts
    assert len(slept) == attempts - 1  # a wait only between tries


def empty_first(request) -> str:
    """The scripted backend's answer here (tests.test_reliability:empty_first): nothing on the first try, as a
    sampled model does whose first token is one of the prompt's stops; agent 1 answers nothing on every try."""
    return "" if request.attempt == 1 or request.agent_id == 1 else f"answer of agent {request.agent_id}"


@pytest.mark.parametrize(("agent", "status", "attempts"), [(0, "ok", 2), (1, "failed", 3)])
def test_an_empty_answer_is_asked_again_and_fails_the_agent_when_it_stays_empty(
    monkeypatch: pytest.MonkeyPatch, agent: int, status: str, attempts: int
):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    spec = AgentSpec(role=Role.RESEARCHER, task="Research A", depends_on=[])
    llm = LLMConfig(backend="scripted", options={"function": f"{__name__}:empty_first"})
    context = AgentContext(path=AgentPath((agent,)), spec=spec, query="q", llm=llm, limits=RunSettings(retries=2).limits())
    result = run_agent(context, [])
    assert (result.status, result.attempts) == (status, attempts)
    assert result.output == ("answer of agent 0" if status == "ok" else "")
    assert result.error == (None if status == "ok" else "the model's answer was empty")


def test_a_hung_call_is_ended_by_the_agent_timeout():
    record = run("3:hang", agent_timeout=0.5, retries=0)
    assert record.agents[3].status == "failed" and "no answer within 0.5 s" in record.agents[3].error
    assert record.agents[7].status == "ok" and record.agents[8].status == "ok"


def test_a_call_that_ignores_its_timeout_is_cancelled_by_the_runtime(latency_file):
    latency = latency_file({"default": 0.0, "3": 120.0})  # sleeps, deaf to the call's timeout
    record = MetaAgent(llm="fake", llm_options={"latency": latency}, agent_timeout=0.5, retries=0).execute(
        json.loads(PLAN.read_text()), "q", save=False
    )
    assert record.agents[3].status == "failed" and record.agents[3].failure is FailureKind.TIMED_OUT and "timed out" in record.agents[3].error
    assert record.agents[8].status == "ok"


def test_killing_the_worker_mid_agent_still_completes_the_run(latency_file):
    latency = latency_file({"default": 0.0, "1": 3.0})
    killed: list[int] = []

    def kill_agent_1(event: object) -> None:
        if isinstance(event, AgentStarted) and str(event.path) == "1" and event.attempt == 1 and event.pid:
            os.kill(event.pid, signal.SIGKILL)
            killed.append(event.pid)

    record = MetaAgent(llm="fake", llm_options={"latency": latency}, on_event=kill_agent_1).execute(
        json.loads(PLAN.read_text()), "q", save=False
    )
    assert killed
    assert record.status == "ok"
    assert record.agents[1].attempts == 2


def test_exec_fails_then_resume_reruns_only_the_failed_agent_and_its_descendants(tmp_path: Path):
    run_dir = tmp_path / "run"
    first = CliRunner().invoke(app, ["exec", str(PLAN), "--llm", "fake", "--fake-fail", "3", "--run-dir", str(run_dir)])
    assert first.exit_code == 1
    assert f"metaagent resume {run_dir}" in first.output
    before = RunRecord.model_validate_json((run_dir / "record.json").read_text())
    assert before.failed_agents() == [3]

    second = CliRunner().invoke(app, ["resume", str(run_dir)])
    assert second.exit_code == 0, second.output
    after = RunRecord.model_validate_json((run_dir / "record.json").read_text())
    assert after.status == "ok"
    rerun = {3, 7, 8}
    assert {agent.id for agent in after.agents if not agent.reused} == rerun
    for agent in after.agents:
        if agent.id not in rerun:  # reused as they were: same output, same timestamps, no new LLM call
            assert agent.reused and agent.started_at == before.agents[agent.id].started_at
            assert agent.output == before.agents[agent.id].output
    assert after.agents[7].inputs_from == [3, 4]
    assert "fail" not in after.settings["llm_options"]
    assert "✅ [PARALLEL] Agent 3 completed: PLANNER" in second.output


def test_resume_of_a_finished_run_reuses_everything(tmp_path: Path):
    run_dir = tmp_path / "run"
    assert CliRunner().invoke(app, ["exec", str(PLAN), "--llm", "fake", "--run-dir", str(run_dir)]).exit_code == 0
    again = CliRunner().invoke(app, ["resume", str(run_dir)])
    assert again.exit_code == 0
    assert all(agent.reused for agent in RunRecord.model_validate_json((run_dir / "record.json").read_text()).agents)


def test_resume_of_something_that_is_not_a_run_is_one_line(tmp_path: Path):
    result = CliRunner().invoke(app, ["resume", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {tmp_path}: not a run directory")


@st.composite
def dags_with_failures(draw: st.DrawFn) -> tuple[dict, set[int]]:
    count = draw(st.integers(min_value=1, max_value=8))
    agents = [
        {"role": "RESEARCHER", "task": f"t{index}", "depends_on": draw(st.lists(st.integers(0, index - 1), max_size=3, unique=True)) if index else []}
        for index in range(count)
    ]
    failing = draw(st.sets(st.integers(0, count - 1), max_size=count))
    return {"description": "random", "agents": agents}, failing


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dags_with_failures(), st.sampled_from(["continue", "stop"]))
def test_every_agent_ends_in_one_final_state_that_agrees_with_the_policy(case: tuple[dict, set[int]], policy: str):
    data, failing = case
    plan = parse_plan(data)
    fail = ",".join(str(agent) for agent in sorted(failing))
    options = {"fail": fail} if fail else {}
    record = MetaAgent(llm="fake", llm_options=options, on_failure=policy).execute(plan, "q", save=False)
    expected: dict[int, str] = {}
    for agent in plan.topological_order():
        deps_ok = all(expected[dep] == "ok" for dep in plan.agents[agent].depends_on)
        if policy == "stop" and not deps_ok:
            expected[agent] = "skipped"
        else:
            expected[agent] = "failed" if agent in failing else "ok"
    assert {agent.id: agent.status for agent in record.agents} == expected
    for agent in record.agents:
        if agent.status != "skipped":
            assert agent.inputs_from == [dep for dep in agent.depends_on if expected[dep] == "ok"]
    assert record.status == ("ok" if not failing else "failed")


def test_ctrl_c_cancels_saves_what_finished_and_prints_the_resume_command(ray_cluster, tmp_path: Path, latency_file):
    run_dir = tmp_path / "run"
    latency = latency_file({"default": 0.2, "1": 30.0, "2": 30.0, "3": 30.0})
    process = start("exec", str(PLAN), "--llm", "fake", "--fake-latency", latency, "--address", ray_cluster.address, "--run-dir", str(run_dir))
    wait_for_line(process, "✅ [PARALLEL] Agent 0 completed")  # fails with what it printed if the command ends first
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 130
    assert errors.strip().splitlines() == [
        f"error: interrupted; the agents that finished are saved in {run_dir}; resume with: metaagent resume {run_dir}"
    ]
    record = RunRecord.model_validate_json((run_dir / "record.json").read_text())
    assert record.status == "interrupted"
    assert record.agents[0].status == "ok" and {agent.status for agent in record.agents[1:]} == {"pending"}

    resumed = CliRunner().invoke(app, ["resume", str(run_dir), "--llm", "fake", "--fake-latency", "0"])  # replaces the stored 30 s
    assert resumed.exit_code == 0, resumed.output
    after = RunRecord.model_validate_json((run_dir / "record.json").read_text())
    assert after.status == "ok" and [agent.reused for agent in after.agents] == [True] + [False] * 8
