"""LLM slots: the cap is exact at the server, and a cluster's agents spread in proportion to its slots."""

from __future__ import annotations

from collections import Counter

import pytest
import ray

from metaagent_ray import MetaAgent, parse_plan
from tests.conftest import HEAD_SLOTS, WORKER_SLOTS

pytestmark = pytest.mark.usefixtures("ray_session")


def wide_plan(width: int) -> dict:
    return {"description": "wide", "agents": [{"role": "RESEARCHER", "task": f"topic {index}"} for index in range(width)]}


@pytest.mark.parametrize("slots", [1, 2, 4])
def test_with_n_slots_the_calls_in_flight_at_the_server_reach_n_and_never_exceed_it(ollama_server, slots: int):
    ollama_server.delay = 0.4
    record = MetaAgent(llm="ollama", llm_options={"host": ollama_server.url}, slots=slots).execute(wide_plan(8), "q", save=False)
    assert record.status == "ok"
    assert ollama_server.max_in_flight == slots


def test_a_wide_plan_spreads_over_both_nodes_in_proportion_to_their_slots(latency_file):
    width = 3 * (HEAD_SLOTS + WORKER_SLOTS)
    latency = latency_file({"default": 1.5})
    agent = MetaAgent(llm="fake", llm_options={"latency": latency})
    agent.execute(parse_plan(wide_plan(HEAD_SLOTS + WORKER_SLOTS)), "warm-up: start workers on both nodes", save=False)
    record = agent.execute(parse_plan(wide_plan(width)), "q", save=False)
    assert record.status == "ok" and record.slots == HEAD_SLOTS + WORKER_SLOTS
    head = ray.get_runtime_context().get_node_id()  # the driver runs on the head node
    per_node = Counter("head" if agent.node == head else "worker" for agent in record.agents)
    assert set(per_node) == {"head", "worker"}
    # each wave fills every slot: 8 on the head and 4 on the worker node, three waves
    assert per_node["head"] / per_node["worker"] == pytest.approx(HEAD_SLOTS / WORKER_SLOTS, rel=0.35)
