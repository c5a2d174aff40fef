"""The plan model: validation, dependency cleaning, cycle fallback, layers (no Ray needed)."""

from __future__ import annotations

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from metaagent_ray.plan import CYCLE_WARNING, ExecutionPlan, Role, explain, remaining_path


def make_plan(*depends_on: list[int], role: str = "RESEARCHER") -> ExecutionPlan:
    return ExecutionPlan.model_validate(
        {"description": "test", "agents": [{"role": role, "task": f"task {i}", "depends_on": deps} for i, deps in enumerate(depends_on)]}
    )


def test_roles_match_case_insensitively():
    plan = ExecutionPlan.model_validate({"agents": [{"role": "researcher", "task": "t"}, {"role": " Critic ", "task": "t"}]})
    assert [agent.role for agent in plan.agents] == [Role.RESEARCHER, Role.CRITIC]


def test_unknown_role_names_the_roles_that_exist():
    with pytest.raises(ValidationError) as error:
        ExecutionPlan.model_validate({"agents": [{"role": "WIZARD", "task": "t"}]})
    line = explain(error.value)
    assert "agents[0].role" in line and "'WIZARD'" in line
    assert all(role.value in line for role in Role)


def test_bad_dependencies_are_dropped_with_a_warning_naming_them():
    plan = make_plan([], [0, 0, 1, 7, -1], [1])
    assert plan.get_dependency_graph() == {0: [], 1: [0], 2: [1]}
    assert plan.warnings == ["Agent 1: dropped dependencies 0 (repeated), 1 (itself), 7 (no such agent), -1 (no such agent)"]


def test_forward_references_without_a_cycle_are_legal():
    plan = make_plan([3], [0], [], [])
    assert plan.warnings == []
    assert plan.get_execution_layers() == [[2, 3], [0], [1]]
    assert plan.topological_order() == [2, 3, 0, 1]


def test_a_cycle_falls_back_to_sequential_execution():
    plan = make_plan([2], [], [0], [1])
    assert set(plan.cycle or []) == {0, 2}
    assert plan.warnings[0].startswith(CYCLE_WARNING)
    assert "cycle: agent" in plan.warnings[0]
    assert plan.get_dependency_graph() == {0: [], 1: [0], 2: [0, 1], 3: [0, 1, 2]}
    assert plan.get_execution_layers() == [[0], [1], [2], [3]]


def test_strict_dependency_types():
    with pytest.raises(ValidationError) as error:
        make_plan(["0"])  # type: ignore[list-item]
    assert "depends_on" in explain(error.value)


def test_no_agents_is_an_error():
    with pytest.raises(ValidationError) as error:
        ExecutionPlan.model_validate({"description": "x", "agents": []})
    assert explain(error.value) == "agents: the plan has no agents"


def test_seed_layers_and_critical_path():
    plan = make_plan([], [], [], [], [0, 1], [0, 1], [2, 4], [3, 4], [5, 6, 7])
    assert plan.get_execution_layers() == [[0, 1, 2, 3], [4, 5], [6, 7], [8]]
    durations = {0: 1.0, 1: 2.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 5.0, 6: 1.0, 7: 1.0, 8: 1.0}
    assert plan.critical_path(durations) == (8.0, [1, 5, 8])
    assert plan.sinks() == [8]
    assert plan.remaining_path() == {0: 4, 1: 4, 2: 3, 3: 3, 4: 3, 5: 2, 6: 2, 7: 2, 8: 1}
    assert plan.remaining_path(durations)[1] == 8.0  # the critical path starts where the most time remains


def test_the_remaining_path_of_a_graph_still_written_counts_a_cycle_once():
    graph = nx.DiGraph([(0, 1), (1, 2), (2, 1), (2, 3), (4, 5)])  # 1 and 2 wait on each other
    assert remaining_path(graph) == {0: 4, 1: 3, 2: 3, 3: 1, 4: 2, 5: 1}
    assert remaining_path(graph, of=[4]) == {4: 2, 5: 1}  # only what lies after the agents asked about


@st.composite
def random_dependencies(draw: st.DrawFn) -> list[list[int]]:
    """Any dependency lists at all: out of range, self, repeated, cycles, forward references."""
    count = draw(st.integers(min_value=1, max_value=12))
    return [draw(st.lists(st.integers(min_value=-2, max_value=count + 1), max_size=6)) for _ in range(count)]


@settings(max_examples=200, deadline=None)
@given(random_dependencies())
def test_cleaning_always_yields_a_valid_dag(depends_on: list[list[int]]):
    plan = make_plan(*depends_on)
    graph = plan.graph()
    assert nx.is_directed_acyclic_graph(graph)
    for index, agent in enumerate(plan.agents):
        assert len(set(agent.depends_on)) == len(agent.depends_on)
        assert all(0 <= dep < len(plan.agents) and dep != index for dep in agent.depends_on)
    layers = plan.get_execution_layers()
    assert sorted(agent for layer in layers for agent in layer) == list(range(len(plan.agents)))
    layer_of = plan.layer_of()
    for index, agent in enumerate(plan.agents):
        assert all(layer_of[dep] < layer_of[index] for dep in agent.depends_on)
        if agent.depends_on:  # a layer is the longest chain below it, not just any valid level
            assert layer_of[index] == 1 + max(layer_of[dep] for dep in agent.depends_on)
    if plan.cycle is None:
        valid = [[d for d in dict.fromkeys(deps) if 0 <= d < len(depends_on) and d != i] for i, deps in enumerate(depends_on)]
        assert [agent.depends_on for agent in plan.agents] == valid
