"""The execution plan: agents, their dependencies, and the layers users see.

A plan comes from a user's file or from a coordinator LLM, so it is validated and cleaned here,
at the edge: bad dependencies are dropped with a warning, and a cycle falls back to sequential
execution, as the seed describes. Everything downstream trusts a cleaned plan.
"""

from __future__ import annotations

import difflib
from enum import Enum
from typing import Any, Iterable, Literal, Mapping

import networkx as nx
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

CYCLE_WARNING = "⚠️ Cycle detected in dependencies, falling back to sequential execution"
MAX_TEXT_IN_PLAN = 300  # characters of a description or task a coordinator LLM may write


class Role(str, Enum):
    """The seven agent roles of the seed."""

    RESEARCHER = "RESEARCHER"
    ANALYZER = "ANALYZER"
    PLANNER = "PLANNER"
    WRITER = "WRITER"
    CRITIC = "CRITIC"
    SYNTHESIZER = "SYNTHESIZER"
    COORDINATOR = "COORDINATOR"


ROLE_NAMES = ", ".join(role.value for role in Role)


class AgentSpec(BaseModel):
    """One agent of a plan: what it is, what it does, whose outputs it needs."""

    # unknown keys are refused: a misspelt `depends_on` would otherwise make the agent a root without a word
    model_config = ConfigDict(extra="forbid")

    role: Role
    task: str = Field(min_length=1)
    depends_on: list[StrictInt] = Field(default_factory=list)

    @field_validator("role", mode="before")
    @classmethod
    def _role_case_insensitive(cls, value: Any) -> Any:
        if isinstance(value, str):
            name = value.strip().upper()
            if name not in Role.__members__:
                raise ValueError(f"unknown role {value!r} (roles: {ROLE_NAMES})")
            return name
        return value


class ExecutionPlan(BaseModel):
    """The coordinator's JSON: a description and agents whose `depends_on` index other agents."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    agents: list[AgentSpec] = Field(min_length=1)
    depth: int = Field(default=0, ge=0)

    _warnings: list[str] = PrivateAttr(default_factory=list)
    _cycle: list[int] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _clean_dependencies(self) -> ExecutionPlan:
        count = len(self.agents)
        for index, agent in enumerate(self.agents):
            agent.depends_on, dropped = clean_dependencies(index, agent.depends_on, count)
            if dropped:
                self._warnings.append(f"Agent {index}: dropped dependencies {', '.join(dropped)}")
        cycle = _find_cycle(self.agents)
        if cycle is not None:
            self._cycle = cycle
            path = " -> ".join(str(i) for i in [*cycle, cycle[0]])
            self._warnings.append(f"{CYCLE_WARNING} (cycle: agent {path}, each waiting on the next)")
            for index, agent in enumerate(self.agents):
                agent.depends_on = list(range(index))
        return self

    @property
    def warnings(self) -> list[str]:
        """What cleaning changed, in words a user can act on."""
        return list(self._warnings)

    def add_warning(self, text: str) -> None:
        """Note something about how this plan came to be (e.g. the coordinator fell back)."""
        self._warnings.append(text)

    @property
    def cycle(self) -> list[int] | None:
        """The cycle that forced sequential execution, if there was one."""
        return self._cycle

    def get_dependency_graph(self) -> dict[int, list[int]]:
        """Adjacency list: agent index -> the agents it depends on."""
        return {index: list(agent.depends_on) for index, agent in enumerate(self.agents)}

    def graph(self) -> nx.DiGraph:
        """The DAG with an edge from each dependency to its dependent."""
        return _dependency_graph(self.agents)

    def get_execution_layers(self) -> list[list[int]]:
        """Topological generations: layer k holds agents whose longest dependency chain is k."""
        return [sorted(layer) for layer in nx.topological_generations(self.graph())]

    def layer_of(self) -> dict[int, int]:
        """Agent index -> its layer number."""
        return {agent: number for number, layer in enumerate(self.get_execution_layers()) for agent in layer}

    def topological_order(self) -> list[int]:
        """An order in which every agent comes after its dependencies (ties by index)."""
        return list(nx.lexicographical_topological_sort(self.graph()))

    def sinks(self) -> list[int]:
        """Agents nobody depends on: their outputs form the final answer."""
        graph = self.graph()
        return [node for node in sorted(graph.nodes) if graph.out_degree(node) == 0]

    def descendants(self, agents: set[int]) -> set[int]:
        """The given agents and everything downstream of them."""
        graph = self.graph()
        found = set(agents)
        for agent in agents:
            found |= nx.descendants(graph, agent)
        return found

    def remaining_path(self, durations: Mapping[int, float] | None = None) -> dict[int, float]:
        """Agent index -> the longest chain from it to the end, itself included: in agents, or in seconds
        given each agent's duration (see `remaining_path`)."""
        return remaining_path(self.graph(), durations)

    def critical_path(self, durations: Mapping[int, float]) -> tuple[float, list[int]]:
        """The longest chain of dependent durations, and its agents: no scheduler can finish sooner."""
        graph = self.graph()
        remaining = remaining_path(graph, durations)
        path = [max(self.topological_order(), key=lambda agent: remaining[agent])]
        while after := list(graph.successors(path[-1])):
            path.append(max(sorted(after), key=lambda agent: remaining[agent]))
        return remaining[path[0]], path


def clean_dependencies(index: int, depends_on: list[int], count: int | None) -> tuple[list[int], list[str]]:
    """Agent `index`'s dependencies without those on no agent, on itself, or repeated; and why each dropped one was.

    `count` is the plan's number of agents, or None while the plan is still being written (plan_stream.py):
    then only what is already certain is judged (a later agent may still come), so what an early start
    keeps is what the finished plan keeps.
    """
    kept: list[int] = []
    dropped: list[str] = []
    for dep in depends_on:
        if dep < 0 or (count is not None and dep >= count):
            dropped.append(f"{dep} (no such agent)")
        elif dep == index:
            dropped.append(f"{dep} (itself)")
        elif dep in kept:
            dropped.append(f"{dep} (repeated)")
        else:
            kept.append(dep)
    return kept, dropped


def remaining_path(graph: nx.DiGraph, durations: Mapping[int, float] | None = None, of: Iterable[int] | None = None) -> dict[int, float]:
    """Agent -> the longest chain from it to the end of `graph`, itself included: how many agents, or how many
    seconds given each agent's duration. Under a slot cap, starting the longest first keeps the critical
    path moving (hub.py).

    `of` limits the answer to those agents (and what lies after them). A plan still being written may
    hold a cycle: the agents of a cycle then count once each.
    """
    if of is not None:
        wanted = set(of)
        graph = graph.subgraph(wanted.union(*(nx.descendants(graph, agent) for agent in wanted)))
    weight = (lambda agent: 1) if durations is None else durations.__getitem__
    if nx.is_directed_acyclic_graph(graph):
        components, members = graph, {agent: [agent] for agent in graph}
    else:
        components = nx.condensation(graph)
        members = {component: data["members"] for component, data in components.nodes(data=True)}
    length: dict[Any, float] = {}
    for component in reversed(list(nx.topological_sort(components))):
        after = max((length[next_] for next_ in components.successors(component)), default=0)
        length[component] = sum(weight(agent) for agent in members[component]) + after
    return {agent: length[component] for component, agents in members.items() for agent in agents}


def too_many_agents(count: int, max_agents: int) -> str | None:
    """Why a plan of `count` agents (or of `count` so far, while it is written) is refused, or None: the one `--max-agents` check."""
    return f"the plan has {count} agents, more than --max-agents {max_agents}" if count > max_agents else None


def _dependency_graph(agents: list[AgentSpec]) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(range(len(agents)))
    for index, agent in enumerate(agents):
        graph.add_edges_from((dep, index) for dep in agent.depends_on)
    return graph


def _find_cycle(agents: list[AgentSpec]) -> list[int] | None:
    """A cycle as agents that each wait on the next, or None."""
    try:
        edges = nx.find_cycle(_dependency_graph(agents))
    except nx.NetworkXNoCycle:
        return None
    return [dependent for _, dependent in edges][::-1]


def _unknown_key(loc: tuple[Any, ...]) -> str:
    """An extra key as the plan's own words, with the nearest key it may have meant."""
    key = str(loc[-1])
    known = AgentSpec.model_fields if loc[0] == "agents" and len(loc) == 3 else ExecutionPlan.model_fields
    nearest = difflib.get_close_matches(key, list(known), n=1)
    return f"unknown key {key!r}" + (f" (did you mean {nearest[0]!r}?)" if nearest else f" (keys: {', '.join(known)})")


def explain(error: ValidationError) -> str:
    """A pydantic validation error as one line: where in the plan, and what is wrong."""
    parts = []
    for item in error.errors():
        loc = item["loc"][:-1] if item["type"] == "extra_forbidden" else item["loc"]
        where = "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in loc).lstrip(".")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = _unknown_key(item["loc"])
        elif item["type"] == "too_short" and item["loc"] == ("agents",):
            message = "the plan has no agents"
        elif item["type"] == "model_type" and not item["loc"]:
            message = "the plan must be a JSON object with 'description' and 'agents'"
        elif item["type"] == "string_unicode":
            message = "not valid text (it holds a lone surrogate, such as the escape \\ud83d without its pair)"
        elif "depends_on" in item["loc"]:
            wanted = "an integer (an agent index)" if isinstance(item["loc"][-1], int) else "a list of integers (agent indices)"
            message = f"must be {wanted}, got {item['input']!r}"
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


class JoinerDecision(BaseModel):
    """The joiner's JSON after a round: finish with what the agents gave, or replan with new agents.

    New agents are numbered after every agent of the earlier rounds; their `depends_on` names those
    agents (whose outputs are reused) or new agents listed before them.
    """

    model_config = ConfigDict(extra="forbid")

    decision: Literal["finish", "replan"]
    reason: str = Field(min_length=1)
    agents: list[AgentSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _replan_adds_agents(self) -> JoinerDecision:
        if self.decision == "replan" and not self.agents:
            raise ValueError("a replan must add at least one agent")
        return self


def _flat_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its `$ref`s inlined and titles and defaults left out: constrained decoders
    (Ollama's `format`, llama.cpp grammars) handle a self-contained schema best."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items() if key not in ("title", "default")}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return inline(schema)


def _bound_agents(flat: dict[str, Any], max_agents: int) -> None:
    """At most `max_agents` agents, each with every key and short text."""
    flat["properties"]["agents"]["maxItems"] = max_agents
    agent = flat["properties"]["agents"]["items"]
    agent["required"] = ["role", "task", "depends_on"]
    agent["properties"]["depends_on"]["maxItems"] = max_agents - 1  # stops a small model counting on forever
    agent["properties"]["task"]["maxLength"] = MAX_TEXT_IN_PLAN


def plan_json_schema(max_agents: int) -> dict[str, Any]:
    """The JSON schema a coordinator LLM must answer in: the plan model's own schema, flattened,
    without `depth` (the runtime sets it)."""
    flat = _flat_schema(ExecutionPlan)
    flat["properties"].pop("depth", None)
    flat["required"] = ["description", "agents"]
    _bound_agents(flat, max_agents)
    flat["properties"]["description"]["maxLength"] = MAX_TEXT_IN_PLAN
    return flat


def joiner_json_schema(max_agents: int) -> dict[str, Any]:
    """The JSON schema the joiner answers in: its decision, why, and the new agents (none to finish)."""
    flat = _flat_schema(JoinerDecision)
    flat["required"] = ["decision", "reason", "agents"]
    _bound_agents(flat, max_agents)
    flat["properties"]["reason"]["maxLength"] = MAX_TEXT_IN_PLAN
    return flat
