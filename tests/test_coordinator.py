"""The coordinator: schema-constrained plans, one retry with the error fed back, a safe fallback.

Malformed coordinator output comes from an Ollama-compatible server over real HTTP, through the
official client; no Ray is needed to plan.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from metaagent_ray import MetaAgent
from metaagent_ray.coordinator import make_plan
from metaagent_ray.llm import LLMConfig, create_llm
from metaagent_ray.plan import CYCLE_WARNING, plan_json_schema
from tests.ollama_server import DEFAULT_PLAN, last_user_message


def plan_with(server, answers: list[str], max_agents: int = 64):
    """Plan against a server whose coordinator gives `answers` in turn (the retry is told the error)."""

    def responder(body: dict[str, Any]) -> str:
        retries = sum(1 for message in body["messages"] if message["role"] == "assistant")
        return answers[min(retries, len(answers) - 1)]

    server.responder = responder
    llm = create_llm(LLMConfig(backend="ollama", options={"host": server.url}))
    return make_plan("Compare A and B", llm, max_agents=max_agents)


VALID = json.dumps(DEFAULT_PLAN)


def test_the_request_carries_the_plan_schema_and_a_valid_answer_is_used_as_is(ollama_server):
    plan, record = plan_with(ollama_server, [VALID])
    assert record.attempts == 1 and not record.fallback and plan.warnings == []
    assert [agent.role.value for agent in plan.agents] == ["RESEARCHER", "RESEARCHER", "ANALYZER", "SYNTHESIZER"]
    (body,) = ollama_server.chat_bodies()
    assert body["format"] == plan_json_schema(64)
    assert "MAXIMIZE PARALLELISM" in body["messages"][0]["content"]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("I think you should research A and B.", "not valid JSON"),
        (json.dumps({"steps": ["research", "write"]}), "agents: Field required"),
        (json.dumps({"description": "x", "agents": [{"role": "WIZARD", "task": "magic", "depends_on": []}]}), "unknown role 'WIZARD'"),
        (json.dumps({"description": "x", "agents": [{"role": "WRITER", "task": "w", "depends_on": "all"}]}), "must be a list of integers"),
        (json.dumps({"description": "x", "agents": [{"role": "WRITER", "task": "w", "depends_on": []}] * 5}), "more than the limit of 4"),
    ],
)
def test_an_invalid_answer_is_retried_with_the_error_then_falls_back(ollama_server, bad: str, reason: str):
    plan, record = plan_with(ollama_server, [bad, VALID], max_agents=4)
    assert record.attempts == 2 and not record.fallback
    assert reason in record.errors[0]
    retry = ollama_server.chat_bodies()[1]
    assert reason in last_user_message(retry) and retry["messages"][-2] == {"role": "assistant", "content": bad}
    assert len(plan.agents) == 4

    ollama_server.reset()
    plan, record = plan_with(ollama_server, [bad], max_agents=4)
    assert record.attempts == 2 and record.fallback
    assert [agent.role.value for agent in plan.agents] == ["RESEARCHER", "SYNTHESIZER"]
    assert plan.warnings[-1].startswith("⚠️ The coordinator's plan was invalid 2 times") and reason in plan.warnings[-1]


def test_a_cyclic_plan_runs_sequentially_with_the_seed_warning(ollama_server):
    cyclic = {
        "description": "cyclic",
        "agents": [
            {"role": "RESEARCHER", "task": "a", "depends_on": [1]},
            {"role": "ANALYZER", "task": "b", "depends_on": [0]},
        ],
    }
    plan, record = plan_with(ollama_server, [json.dumps(cyclic)])
    assert record.attempts == 1
    assert plan.warnings[0].startswith(CYCLE_WARNING)
    assert plan.get_execution_layers() == [[0], [1]]


@pytest.mark.usefixtures("ray_session")
def test_garbage_from_the_fake_coordinator_never_crashes_a_run(tmp_path):
    record = MetaAgent(llm="fake", llm_options={"fail": "coordinator:garbage"}).run("Compare A and B", save=False)
    assert record.status == "ok"
    assert record.coordinator is not None and record.coordinator.fallback
    assert any("using a fallback plan" in warning for warning in record.warnings)
