"""Streamed answers reach the driver as `TokensArrived` events, and the record holds the whole run's clock."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from metaagent_ray import MetaAgent, PlanningStarted, SubPlanReady, TokensArrived
from metaagent_ray import events as run_events
from metaagent_ray.events import COORDINATOR, TOKEN_EVENT_INTERVAL_S, TokenCounter

pytestmark = pytest.mark.usefixtures("ray_session")
QUERY = "Compare Python, Rust, and Go for web development"


def test_tokens_stream_from_the_coordinator_and_every_agent_while_they_answer():
    events: list = []
    with MetaAgent(llm="fake", stream=True, llm_options={"latency": 1.0}, on_event=events.append) as agent:
        record = agent.run(QUERY, save=False)
    assert record.status == "ok"
    assert any(isinstance(event, PlanningStarted) for event in events)
    tokens = [event for event in events if isinstance(event, TokensArrived)]
    assert {event.path for event in tokens} == {COORDINATOR, *(agent.path for agent in record.agents)}
    for agent in record.agents:
        mine = [event for event in tokens if event.path == agent.path]
        counts = [event.tokens for event in mine]
        assert all(earlier < later for earlier, later in zip(counts, counts[1:]))  # each event brings new tokens
        assert counts[-1] <= agent.tokens.completion  # type: ignore[union-attr]
        assert agent.output.startswith("".join(event.text for event in mine))  # in order, nothing lost on the way


def test_without_stream_no_token_events_are_sent():
    events: list = []
    MetaAgent(llm="fake", llm_options={"latency": 0.5}, on_event=events.append).run(QUERY, save=False)
    assert not any(isinstance(event, TokensArrived) for event in events)


@pytest.mark.parametrize("stream_plan", [True, False])
def test_the_record_has_the_coordinator_and_submission_times(stream_plan: bool):
    record = MetaAgent(llm="fake", llm_options={"latency": 0.2}, stream_plan=stream_plan).run(QUERY, save=False)
    coordinator = record.coordinator
    assert coordinator is not None and coordinator.started_at is not None and coordinator.finished_at is not None
    assert coordinator.llm_ms == 200  # the fake's one call, as it reports it
    assert coordinator.finished_at - coordinator.started_at >= coordinator.llm_ms / 1000  # the record's window holds that call
    # Streamed, agents are handed to Ray while the plan is written; otherwise once it is complete.
    handed_from = coordinator.started_at if stream_plan else coordinator.finished_at
    for agent in record.agents:
        assert agent.submitted_at is not None and handed_from <= agent.submitted_at <= agent.started_at  # type: ignore[operator]
    early = [record.agents[index] for index in coordinator.started_early]
    assert all(agent.submitted_at < coordinator.finished_at for agent in early)  # type: ignore[operator]  # the plan was still being written
    assert coordinator.streamed == stream_plan and (coordinator.started_early != []) == stream_plan
    assert record.ray_started_at is None and record.ray_ready_at is None  # the tests' Ray was already up


def test_a_delegating_agent_announces_its_sub_plan():
    events: list = []
    plan = {"agents": [{"role": "RESEARCHER", "task": "Survey [delegate]", "depends_on": []}]}
    record = MetaAgent(llm="fake", max_depth=1, on_event=events.append).execute(plan, "q", save=False)
    sub_plans = [event for event in events if isinstance(event, SubPlanReady)]
    assert len(sub_plans) == 1 and str(sub_plans[0].path) == "0"
    assert record.agents[0].sub_run is not None and len(sub_plans[0].plan.agents) == len(record.agents[0].sub_run.agents)
    assert all(sub.submitted_at is not None for sub in record.agents[0].sub_run.agents)


def test_the_token_counter_sends_at_most_one_event_per_interval(monkeypatch: pytest.MonkeyPatch):
    now = [100.0]  # the counter's clock, moved by hand
    monkeypatch.setattr(run_events, "time", SimpleNamespace(monotonic=lambda: now[0]))
    sent: list[TokensArrived] = []
    counter = TokenCounter("3", sent.append)
    for _ in range(1000):  # all within the first interval: held back
        counter("x")
    assert counter.tokens == 1000 and sent == []
    now[0] += TOKEN_EVENT_INTERVAL_S
    counter("y")  # the interval is over: one event carries everything held back
    assert sent == [TokensArrived(path="3", tokens=1001, text="x" * 1000 + "y")]
    now[0] += TOKEN_EVENT_INTERVAL_S / 2
    counter("z")
    assert len(sent) == 1  # half an interval after the last event
    now[0] += TOKEN_EVENT_INTERVAL_S
    counter("w")
    assert sent[1:] == [TokensArrived(path="3", tokens=1003, text="zw")]
