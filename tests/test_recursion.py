"""Recursive agents: an agent may delegate its task to a sub-plan, which runs as Ray tasks like any other.

The fake LLM delegates whenever a task holds "[delegate]" and the depth allows; its coordinator keeps
the marker in the sub-plan's first task, so every level delegates again until --max-depth.
"""

from __future__ import annotations

import pytest

from metaagent_ray import MetaAgent, Notice
from metaagent_ray.record import AgentRecord
from tests.conftest import DELEGATING_PLAN

pytestmark = pytest.mark.usefixtures("ray_session")



def depth_of(agent: AgentRecord) -> int:
    """How many levels of sub-runs hang under this agent."""
    if agent.sub_run is None:
        return 0
    return 1 + max(depth_of(sub) for sub in agent.sub_run.agents)


def all_agents(agents: list[AgentRecord]) -> list[AgentRecord]:
    return [found for agent in agents for found in [agent, *all_agents(agent.sub_run.agents if agent.sub_run else [])]]


@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("max_depth", [2, 3])
def test_recursive_plans_finish_under_few_slots(slots: int, max_depth: int):
    record = MetaAgent(llm="fake", slots=slots, max_depth=max_depth).execute(DELEGATING_PLAN, "q", save=False)
    assert record.status == "ok"
    delegating = record.agents[0]
    assert depth_of(delegating) == max_depth
    everyone = all_agents(record.agents)
    assert all(agent.status == "ok" and agent.finished_at is not None for agent in everyone)
    assert len({agent.path for agent in everyone}) == len(everyone)
    # the nested record is complete: each sub-run has its plan, layers and one record per sub-agent
    level = delegating
    for depth in range(1, max_depth + 1):
        sub_run = level.sub_run
        assert sub_run is not None and len(sub_run.agents) == len(sub_run.plan.agents) == 3
        assert sub_run.plan.depth == depth and sub_run.layers == [[0], [1], [2]]
        assert [str(agent.path) for agent in sub_run.agents] == [f"{level.path}.{index}" for index in range(3)]
        assert level.output == sub_run.agents[2].output  # the sub-plan's final output is the parent's
        level = sub_run.agents[0]
    assert record.agents[2].inputs_from == [0, 1]
    assert record.agents[2].output.endswith("Inputs from agents: 0, 1")


def test_the_total_agent_budget_ends_delegation_with_a_warning():
    events: list = []
    record = MetaAgent(llm="fake", max_depth=3, max_total_agents=6, on_event=events.append).execute(DELEGATING_PLAN, "q", save=False)
    assert record.status == "ok"
    assert depth_of(record.agents[0]) == 1  # 3 top-level + 3 in the first sub-plan; the next would exceed 6
    warnings = [event.text for event in events if isinstance(event, Notice) and event.warning]
    assert len(warnings) == 1 and "--max-total-agents 6" in warnings[0]
    assert warnings[0] in record.warnings


def test_no_delegation_at_max_depth_zero():
    record = MetaAgent(llm="fake", max_depth=0).execute(DELEGATING_PLAN, "q", save=False)
    assert record.agents[0].sub_run is None and record.agents[0].output.startswith("[RESEARCHER] agent 0")
