"""Adversarial backends, through real HTTP to the OpenAI-compatible stand-in server on 127.0.0.1:
errors, a slow drip, broken and hostile answers, a connection cut mid-answer, a server that never
answers. A bad answer fails its own agent (the rest of the run goes on and resume can finish it) or
sends the coordinator to its retry and fallback plan; nothing ends the whole run with a traceback or hangs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from click.testing import Result

from tests.adversarial import TWO_AND_JOIN, error_line, invoke, write_plan
from tests.ollama_server import first_calls, last_user_message
from tests.stand_in_server import Fault, StandInServer, answer
from tests.test_run_endings import load

pytestmark = pytest.mark.usefixtures("ray_session")

QUERY = "Compare A and B"
FIRST, SECOND, LAST = (agent["task"] for agent in TWO_AND_JOIN["agents"])


def task_of(body: dict[str, Any]) -> str | None:
    """The task of the agent making this call (None for the coordinator), as its prompt states it."""
    _, marker, rest = last_user_message(body).partition("Your task in the plan:\n")
    return rest.splitlines()[0] if marker else None


def is_coordinator(body: dict[str, Any]) -> bool:
    return body.get("response_format") is not None


@pytest.fixture
def server() -> Iterator[StandInServer]:
    with StandInServer(api="openai", stall_seconds=60) as running:
        yield running


def answers(server: StandInServer, **by_task: str) -> None:
    """The agents with these tasks answer this text; the others, and the coordinator, as usual."""
    server.responder = lambda body: by_task.get(task_of(body) or "", None) or answer(body)


def faults(server: StandInServer, fault: Fault, *, tasks: tuple[str, ...] = (), coordinator: bool = False) -> None:
    """Calls of these agents (or of the coordinator) get `fault`; every other call is answered."""
    server.fault = lambda body: fault if (coordinator and is_coordinator(body)) or task_of(body) in tasks else None


def plans(server: StandInServer, text: Callable[[], str]) -> None:
    """The coordinator answers `text()`; agents answer as usual."""
    server.responder = lambda body: text() if is_coordinator(body) else answer(body)


def run_exec(server: StandInServer, tmp_path: Path, *options: str, plan: object = TWO_AND_JOIN) -> Result:
    plan_file = write_plan(tmp_path / "plan.json", plan)
    backend = ["--llm", "openai", "--openai-base-url", server.base_url, "--model", "test-model"]
    return invoke("exec", str(plan_file), *backend, "--run-dir", str(tmp_path / "run"), *options)


def run_query(server: StandInServer, tmp_path: Path, *options: str) -> Result:
    backend = ["--llm", "openai", "--openai-base-url", server.base_url, "--model", "test-model"]
    return invoke("run", QUERY, *backend, "--run-dir", str(tmp_path / "run"), *options)


def calls_of(server: StandInServer, task: str) -> int:
    return sum(1 for body in server.chat_bodies() if task_of(body) == task)


def only_the_second_failed(result: Result, tmp_path: Path, reason: str) -> None:
    """The outcome of an agent whose backend failed it: it alone failed, its dependent ran without it,
    the run ended `failed` (exit 1) with the command that resumes it."""
    assert result.exit_code == 1, result.output[-3000:]
    assert "Traceback" not in result.output
    record = load(tmp_path / "run")
    assert record.status == "failed" and [agent.status for agent in record.agents] == ["ok", "failed", "ok"]
    assert reason in (record.agents[1].error or ""), record.agents[1].error
    assert record.agents[2].inputs_from == [0]
    assert f"To re-run what did not finish: metaagent resume {tmp_path / 'run'}" in result.output


def test_http_500_on_every_call_of_an_agent_fails_it_alone_after_its_retries(server: StandInServer, tmp_path: Path):
    faults(server, "http_500", tasks=(SECOND,))
    result = run_exec(server, tmp_path, "--retries", "1")
    only_the_second_failed(result, tmp_path, "answered HTTP 500: test fault 500")
    assert calls_of(server, SECOND) == 2 and load(tmp_path / "run").agents[1].attempts == 2


def coordinator_calls(server: StandInServer) -> int:
    return sum(1 for body in server.chat_bodies() if is_coordinator(body))


def test_http_500_from_the_coordinator_is_asked_again_then_one_line_and_no_run_is_left(server: StandInServer, tmp_path: Path):
    faults(server, "http_500", coordinator=True)
    result = run_query(server, tmp_path)
    error_line(result.output, 1, result.exit_code, "the coordinator's LLM call failed: ", "answered HTTP 500: test fault 500")
    assert coordinator_calls(server) == 2 and not (tmp_path / "run").exists()


def test_one_http_500_from_the_coordinator_is_asked_again_and_the_run_finishes(server: StandInServer, tmp_path: Path):
    server.fault = first_calls(1, "http_500")
    result = run_query(server, tmp_path)
    assert result.exit_code == 0, result.output[-3000:]
    record = load(tmp_path / "run")
    assert record.status == "ok" and record.coordinator is not None and record.coordinator.attempts == 2 and not record.coordinator.fallback


def test_a_slow_drip_that_never_ends_is_cut_off_by_the_agent_deadline(server: StandInServer, tmp_path: Path):
    faults(server, "drip", tasks=(SECOND,))  # a byte every 0.1 s: no read ever times out
    result = run_exec(server, tmp_path, "--agent-timeout", "1", "--retries", "0")
    only_the_second_failed(result, tmp_path, "timed out: no result within 6 s (--agent-timeout); the agent was abandoned")


def test_invalid_json_from_the_server_fails_that_agent_alone(server: StandInServer, tmp_path: Path):
    faults(server, "malformed", tasks=(SECOND,))
    only_the_second_failed(run_exec(server, tmp_path), tmp_path, "sent a malformed response (JSONDecodeError)")
    assert calls_of(server, SECOND) == 1  # a malformed answer is not retried: it would come again


def test_a_connection_closed_mid_answer_is_retried_then_fails_that_agent_alone(server: StandInServer, tmp_path: Path):
    faults(server, "cut", tasks=(SECOND,))
    result = run_exec(server, tmp_path, "--retries", "1")
    only_the_second_failed(result, tmp_path, "connection to the server at")
    assert calls_of(server, SECOND) == 2


def test_a_server_that_never_answers_an_agent_is_bounded_by_the_agent_timeout(server: StandInServer, tmp_path: Path):
    faults(server, "stall", tasks=(SECOND,))
    result = run_exec(server, tmp_path, "--agent-timeout", "1", "--retries", "0")
    only_the_second_failed(result, tmp_path, "did not answer within 1 s")


def test_a_server_that_never_answers_the_coordinator_is_bounded_by_the_agent_timeout(server: StandInServer, tmp_path: Path):
    faults(server, "stall", coordinator=True)
    result = run_query(server, tmp_path, "--agent-timeout", "1")
    error_line(result.output, 1, result.exit_code, "the coordinator's LLM call failed: ", "did not answer within 1 s")
    assert coordinator_calls(server) == 2 and not (tmp_path / "run").exists()


def test_a_plan_stream_cut_midway_is_one_line_never_a_truncated_plan(server: StandInServer, tmp_path: Path):
    faults(server, "cut", coordinator=True)
    result = run_query(server, tmp_path)
    error_line(result.output, 1, result.exit_code, "the coordinator's LLM call failed: ", "closed the stream before the answer's end")
    assert coordinator_calls(server) == 2 and not (tmp_path / "run").exists()


def fell_back(result: Result, server: StandInServer, tmp_path: Path, reason: str) -> None:
    """The coordinator's promised path for a bad plan: one retry with the error fed back, then the fallback plan, and a run that finishes."""
    assert result.exit_code == 0, result.output[-3000:]
    record = load(tmp_path / "run")
    assert record.status == "ok" and record.coordinator is not None and record.coordinator.fallback
    assert record.coordinator.attempts == 2 and all(reason in error for error in record.coordinator.errors), record.coordinator.errors
    assert f"⚠️ The coordinator's plan was invalid 2 times ({reason}" in result.output
    retry = [body for body in server.chat_bodies() if is_coordinator(body)][1]
    assert reason in last_user_message(retry)  # the retry told the model what was wrong


def test_a_plan_that_violates_the_schema_gets_one_retry_then_the_fallback_plan(server: StandInServer, tmp_path: Path):
    plans(server, lambda: json.dumps({"description": "d", "agents": [{"role": "WIZARD", "task": "t", "depends_on": []}]}))
    fell_back(run_query(server, tmp_path), server, tmp_path, "agents[0].role: unknown role 'WIZARD'")


def test_a_plan_nested_100000_deep_gets_the_retry_and_the_fallback_not_a_recursion_error(server: StandInServer, tmp_path: Path):
    plans(server, lambda: "[" * 100_000 + "]" * 100_000)
    fell_back(run_query(server, tmp_path), server, tmp_path, "its JSON nests too deeply to be a plan")


def test_a_plan_holding_a_lone_surrogate_gets_the_retry_and_the_fallback(server: StandInServer, tmp_path: Path):
    plans(
        server, lambda: json.dumps({"description": "d", "agents": [{"role": "RESEARCHER", "task": "half \ud83d emoji", "depends_on": []}]})
    )
    fell_back(run_query(server, tmp_path), server, tmp_path, "agents[0].task: not valid text")


def test_a_lone_surrogate_in_an_agent_answer_is_replaced_and_the_run_finishes(server: StandInServer, tmp_path: Path):
    answers(server, **{SECOND: "half an emoji: \ud83d, then the rest"})  # JSON carries it as the escape \ud83d
    result = run_exec(server, tmp_path)
    assert result.exit_code == 0, result.output[-3000:]
    record = load(tmp_path / "run")
    assert record.status == "ok" and record.agents[1].output == "half an emoji: \ufffd, then the rest"
    assert "half an emoji: \ufffd" in (tmp_path / "run" / "agents" / "01-researcher.md").read_text(encoding="utf-8")


def test_a_50_mb_answer_within_its_budget_is_kept_whole_and_the_run_finishes(server: StandInServer, tmp_path: Path):
    huge = " ".join(f"w{index}" for index in range(6_000_000))  # about 50 MB, no sentence repeated
    answers(server, **{FIRST: huge})
    result = run_exec(server, tmp_path, "--max-tokens", "6000000", plan={"agents": [TWO_AND_JOIN["agents"][0]]})
    assert result.exit_code == 0, result.output[-3000:]
    record = load(tmp_path / "run")
    assert record.status == "ok" and record.agents[0].output == huge
    assert (tmp_path / "run" / "agents" / "00-researcher.md").stat().st_size > 50_000_000


def test_a_50_mb_answer_is_cut_to_the_roles_budget_by_default(server: StandInServer, tmp_path: Path):
    answers(server, **{FIRST: " ".join(f"w{index}" for index in range(6_000_000))})
    result = run_exec(server, tmp_path, plan={"agents": [TWO_AND_JOIN["agents"][0]]})
    assert result.exit_code == 0, result.output[-3000:]
    agent = load(tmp_path / "run").agents[0]
    assert agent.status == "ok" and agent.finish_reason == "length" and 0 < len(agent.output.split()) <= 2048
