"""The coordinator: schema-constrained plans, one retry with the error fed back, a safe fallback.

The coordinator's answers come from the scripted backend, one per attempt; no Ray is needed to plan.
"""

from __future__ import annotations

import json

import pytest

from metaagent_ray import MetaAgent
from metaagent_ray.coordinator import make_plan
from metaagent_ray.llm import LLMConfig, LLMRequest, create_llm
from metaagent_ray.plan import CYCLE_WARNING, plan_json_schema
from metaagent_ray.settings import RunSettings
from tests.ollama_server import DEFAULT_PLAN

ANSWERS: list[str] = []  # the coordinator's answer to each attempt, the last one repeated
REQUESTS: list[LLMRequest] = []


def by_attempt(request: LLMRequest) -> str:
    """The scripted coordinator (tests.test_coordinator:by_attempt): ANSWERS[attempt - 1]."""
    REQUESTS.append(request)
    return ANSWERS[min(request.attempt, len(ANSWERS)) - 1]


def plan_with(answers: list[str], max_agents: int = 64):
    """Plan with a coordinator that gives `answers` in turn (the retry is told the error)."""
    ANSWERS[:], REQUESTS[:] = answers, []
    llm = create_llm(LLMConfig(backend="scripted", options={"function": f"{__name__}:by_attempt"}))
    return make_plan("Compare A and B", llm, max_agents=max_agents, answer_tokens=RunSettings().answer_tokens)


VALID = json.dumps(DEFAULT_PLAN)


def test_the_request_carries_the_plan_schema_and_a_valid_answer_is_used_as_is():
    plan, record = plan_with([VALID])
    assert record.attempts == 1 and not record.fallback and plan.warnings == []
    assert [agent.role.value for agent in plan.agents] == ["RESEARCHER", "RESEARCHER", "ANALYZER", "SYNTHESIZER"]
    (request,) = REQUESTS
    assert request.json_schema == plan_json_schema(64)
    assert "MAXIMIZE PARALLELISM" in request.messages[0].content


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("I think you should research A and B.", "not valid JSON"),
        (json.dumps({"steps": ["research", "write"]}), "agents: Field required"),
        (json.dumps({"description": "x", "agents": [{"role": "WIZARD", "task": "magic", "depends_on": []}]}), "unknown role 'WIZARD'"),
        (json.dumps({"description": "x", "agents": [{"role": "WRITER", "task": "w", "depends_on": "all"}]}), "must be a list of integers"),
        (json.dumps({"description": "x", "agents": [{"role": "WRITER", "task": "w", "depends_on": []}] * 5}), "more than --max-agents 4"),
        (
            json.dumps({"description": "x", "agents": [{"role": "WRITER", "task": "w", "depend_on": []}]}),
            "agents[0]: unknown key 'depend_on' (did you mean 'depends_on'?)",
        ),
    ],
)
def test_an_invalid_answer_is_retried_with_the_error_then_falls_back(bad: str, reason: str):
    plan, record = plan_with([bad, VALID], max_agents=4)
    assert record.attempts == 2 and not record.fallback
    assert reason in record.errors[0]
    retry = REQUESTS[1]
    assert reason in retry.messages[-1].content and (retry.messages[-2].role, retry.messages[-2].content) == ("assistant", bad)
    assert len(plan.agents) == 4

    plan, record = plan_with([bad], max_agents=4)
    assert record.attempts == 2 and record.fallback
    assert [agent.role.value for agent in plan.agents] == ["RESEARCHER", "SYNTHESIZER"]
    assert plan.warnings[-1].startswith("⚠️ The coordinator's plan was invalid 2 times") and reason in plan.warnings[-1]


def test_a_cyclic_plan_runs_sequentially_with_the_seed_warning():
    cyclic = {
        "description": "cyclic",
        "agents": [
            {"role": "RESEARCHER", "task": "a", "depends_on": [1]},
            {"role": "ANALYZER", "task": "b", "depends_on": [0]},
        ],
    }
    plan, record = plan_with([json.dumps(cyclic)])
    assert record.attempts == 1
    assert plan.warnings[0].startswith(CYCLE_WARNING)
    assert plan.get_execution_layers() == [[0], [1]]


@pytest.mark.usefixtures("ray_session")
def test_garbage_from_the_fake_coordinator_never_crashes_a_run(tmp_path):
    record = MetaAgent(llm="fake", llm_options={"fail": "coordinator:garbage"}).run("Compare A and B", save=False)
    assert record.status == "ok"
    assert record.coordinator is not None and record.coordinator.fallback
    assert any("using a fallback plan" in warning for warning in record.warnings)
