"""Whole runs against an Ollama-compatible server over real HTTP: the official client, Ray workers, slots."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from typer.testing import CliRunner

from metaagent_ray import MetaAgent
from metaagent_ray.cli import app
from metaagent_ray.plan import plan_json_schema
from metaagent_ray.record import RecordedLLM
from tests.conftest import EXAMPLES
from tests.ollama_server import allow_model_requests_to

pytestmark = pytest.mark.usefixtures("ray_session")

QUERY = "Compare Python, Rust, and Go for web development"
THREE_RESEARCHERS = {
    "description": "Research three languages in parallel, then compare and report",
    "agents": [
        {"role": "RESEARCHER", "task": "Research Python", "depends_on": []},
        {"role": "RESEARCHER", "task": "Research Rust", "depends_on": []},
        {"role": "RESEARCHER", "task": "Research Go", "depends_on": []},
        {"role": "ANALYZER", "task": "Compare them", "depends_on": [0, 1, 2]},
        {"role": "SYNTHESIZER", "task": "Write the report", "depends_on": [3]},
    ],
}


def is_researcher(body: dict[str, Any]) -> bool:
    return body["messages"][0]["content"].startswith("You are a RESEARCHER")


def test_a_run_through_ollama_plans_with_the_schema_and_names_the_model_in_every_call(ollama_server, tmp_path):
    ollama_server.models["qwen-test:0.5b"] = 400_000_000
    meeting = threading.Barrier(3, timeout=30)

    def responder(body: dict[str, Any]) -> str:
        if body.get("format") is not None:
            return json.dumps(THREE_RESEARCHERS)
        if is_researcher(body):
            meeting.wait()  # returns only once all three researchers' requests are in flight together
        return f"answer from {body['messages'][0]['content'].split()[3]}"

    ollama_server.responder = responder
    agent = MetaAgent(llm="ollama", model="qwen-test:0.5b", llm_options={"host": ollama_server.url})
    record = agent.run(QUERY, run_dir=tmp_path / "run")

    assert record.status == "ok", [agent.error for agent in record.agents]
    bodies = ollama_server.chat_bodies()
    assert len(bodies) == 1 + 5
    assert all(body["model"] == "qwen-test:0.5b" for body in bodies)
    assert bodies[0]["format"] == plan_json_schema(64)
    assert all(body.get("format") is None for body in bodies[1:])
    assert ollama_server.max_in_flight == 3
    assert record.layers == [[0, 1, 2], [3], [4]]
    assert record.final_output == "answer from SYNTHESIZER"
    for agent_record in record.agents:
        assert agent_record.tokens is not None and agent_record.tokens.completion > 0
        assert agent_record.llm_ms is not None and agent_record.llm_ms > 0
    assert record.llm == RecordedLLM(backend="ollama", model="qwen-test:0.5b")


def test_slots_2_never_lets_more_than_two_calls_reach_the_server(ollama_server):
    ollama_server.delay = lambda body: 0.5 if is_researcher(body) else 0.0
    agent = MetaAgent(llm="ollama", llm_options={"host": ollama_server.url}, slots=2)
    record = agent.execute(THREE_RESEARCHERS, QUERY, save=False)
    assert record.status == "ok"
    assert ollama_server.max_in_flight == 2


def test_an_unreachable_server_is_one_line_and_exit_2_before_any_agent_runs(tmp_path):
    allow_model_requests_to("http://127.0.0.1:9")  # nothing answers there
    result = CliRunner().invoke(
        app, ["run", QUERY, "--llm", "ollama", "--ollama-host", "http://127.0.0.1:9", "--run-dir", str(tmp_path / "run")]
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: cannot reach Ollama at http://127.0.0.1:9: start it with `ollama serve` (or set OLLAMA_HOST / --ollama-host)"
    ]
    assert not (tmp_path / "run").exists()


def test_a_model_that_is_not_pulled_is_one_line_and_exit_2(ollama_server, tmp_path):
    result = CliRunner().invoke(
        app, ["exec", str(EXAMPLES / "parallel_research.json"), "--llm", "ollama", "--model", "llama3.2:1b-missing", "--ollama-host", ollama_server.url]
    )
    assert result.exit_code == 2
    assert "run `ollama pull llama3.2:1b-missing`" in result.output
    assert ollama_server.chat_bodies() == []


def test_run_with_the_fake_backend_prints_three_parallel_researchers(tmp_path):
    result = CliRunner().invoke(app, ["run", QUERY, "--llm", "fake", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "  Layer 0: 3 agents in parallel - ['RESEARCHER', 'RESEARCHER', 'RESEARCHER']" in result.output
    assert "📝 Final output:" in result.output
    assert result.stdout.rstrip().endswith("Inputs from agents: 3")


def test_server_faults_in_a_run_end_in_the_right_states(ollama_server):
    """500 and a dropped connection are retried; malformed JSON fails for good; a stall times out."""
    from tests.ollama_server import last_user_message

    seen: dict[str, int] = {}
    lock = threading.Lock()

    def fault(body: dict[str, Any]):
        topic = next((name for name in ("error", "drop", "malformed", "stall") if f"topic {name}" in last_user_message(body)), None)
        with lock:
            seen[topic or ""] = seen.get(topic or "", 0) + 1
            first = seen[topic or ""] == 1
        if topic in ("error", "drop"):
            return {"error": "http_500", "drop": "drop"}[topic] if first else None
        return topic

    ollama_server.fault = fault
    ollama_server.stall_seconds = 5
    plan = {
        "description": "faults",
        "agents": [{"role": "RESEARCHER", "task": f"Research topic {name}"} for name in ("error", "drop", "malformed", "stall", "fine")],
    }
    agent = MetaAgent(llm="ollama", llm_options={"host": ollama_server.url}, agent_timeout=1, retries=1)
    record = agent.execute(plan, QUERY, save=False)
    states = {agent.task.removeprefix("Research topic "): (agent.status, agent.attempts) for agent in record.agents}
    assert states == {"error": ("ok", 2), "drop": ("ok", 2), "malformed": ("failed", 1), "stall": ("failed", 2), "fine": ("ok", 1)}
    assert "malformed response" in record.agents[2].error
    assert "did not answer within 1 s" in record.agents[3].error
