"""The execution plan: agents, their dependencies, and the layers users see.

A plan comes from a user's file or from a coordinator LLM, so it is validated and cleaned here,
at the edge: bad dependencies are dropped with a warning, and a cycle falls back to sequential
execution, as the seed describes. Everything downstream trusts a cleaned plan.
"""

from __future__ import annotations

import difflib
from enum import Enum
from typing import Any, Mapping

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
            kept: list[int] = []
            dropped: list[str] = []
            for dep in agent.depends_on:
                if not 0 <= dep < count:
                    dropped.append(f"{dep} (no such agent)")
                elif dep == index:
                    dropped.append(f"{dep} (itself)")
                elif dep in kept:
                    dropped.append(f"{dep} (repeated)")
                else:
                    kept.append(dep)
            if dropped:
                self._warnings.append(f"Agent {index}: dropped dependencies {', '.join(dropped)}")
            agent.depends_on = kept
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

    def remaining_path(self) -> dict[int, int]:
        """Agent index -> how many agents lie on the longest chain from it to the end (itself included):
        under a slot cap, starting the longest first keeps the critical path moving."""
        graph = self.graph()
        remaining: dict[int, int] = {}
        for agent in reversed(self.topological_order()):
            remaining[agent] = 1 + max((remaining[after] for after in graph.successors(agent)), default=0)
        return remaining

    def critical_path(self, durations: Mapping[int, float]) -> tuple[float, list[int]]:
        """The longest chain of dependent durations: no scheduler can finish sooner."""
        finish: dict[int, float] = {}
        previous: dict[int, int | None] = {}
        for agent in self.topological_order():
            deps = self.agents[agent].depends_on
            before = max(deps, key=lambda dep: finish[dep], default=None)
            previous[agent] = before
            finish[agent] = durations[agent] + (finish[before] if before is not None else 0.0)
        last = max(finish, key=lambda agent: finish[agent])
        path = [last]
        while (step := previous[path[-1]]) is not None:
            path.append(step)
        return finish[last], path[::-1]


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


def plan_json_schema(max_agents: int) -> dict[str, Any]:
    """The JSON schema a coordinator LLM must answer in: the plan model's own schema, flattened.

    `$ref`s are inlined and `depth` left out (the runtime sets it), because constrained decoders
    (Ollama's `format`, llama.cpp grammars) handle a self-contained schema best.
    """
    schema = ExecutionPlan.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items() if key not in ("title", "default")}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    flat = inline(schema)
    flat["properties"].pop("depth", None)
    flat["required"] = ["description", "agents"]
    flat["properties"]["agents"]["maxItems"] = max_agents
    agent = flat["properties"]["agents"]["items"]
    agent["required"] = ["role", "task", "depends_on"]
    agent["properties"]["depends_on"]["maxItems"] = max_agents - 1  # stops a small model counting on forever
    agent["properties"]["task"]["maxLength"] = flat["properties"]["description"]["maxLength"] = MAX_TEXT_IN_PLAN
    return flat
