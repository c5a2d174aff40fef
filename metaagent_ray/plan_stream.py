"""A plan read while the coordinator still writes it: which agents are known, and which are safe to start.

LLMCompiler's idea (Kim et al., 2024): the first agents' JSON objects are complete long before the
plan is, so an agent can start as soon as its object is complete and every agent it depends on is
known. Such an agent can never be part of a cycle (its ancestors are all known and none of them
is itself), and its dependencies are cleaned exactly as the whole plan's will be (plan.py), so it
runs as it would have after the plan. When the finished plan disagrees (a cycle somewhere, a
validation error, a fallback), what started early is set aside by the runtime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import networkx as nx
from pydantic import ValidationError

from .plan import AgentSpec, ExecutionPlan, clean_dependencies, remaining_path, too_many_agents


class AgentObjects:
    """Finds the complete objects of the top-level "agents" array in a JSON text that arrives in pieces.

    A small scanner (strings, escapes, nesting) that never re-reads what it has seen; the objects
    it returns are parsed with `json.loads`.
    """

    def __init__(self) -> None:
        self._text: list[str] = []
        self._offset = 0  # characters scanned so far
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._string_start = 0
        self._last_string = ""
        self._agents_depth: int | None = None  # the nesting depth inside the agents array, once it opened
        self._object_start: int | None = None

    def feed(self, piece: str) -> list[object]:
        """The agent objects completed by this piece, parsed (None for one that is not valid JSON)."""
        self._text.append(piece)
        text = "".join(self._text)
        self._text = [text]
        found: list[object] = []
        for position in range(self._offset, len(text)):
            char = text[position]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
                    self._last_string = text[self._string_start + 1 : position]
                continue
            if char == '"':
                self._in_string, self._string_start = True, position
            elif char in "{[":
                self._depth += 1
                if char == "[" and self._depth == 2 and self._last_string == "agents" and self._agents_depth is None:
                    self._agents_depth = 2
                elif char == "{" and self._agents_depth is not None and self._depth == self._agents_depth + 1:
                    self._object_start = position
            elif char in "}]":
                if char == "}" and self._object_start is not None and self._depth == (self._agents_depth or 0) + 1:
                    found.append(_loads(text[self._object_start : position + 1]))
                    self._object_start = None
                elif char == "]" and self._depth == self._agents_depth:
                    self._agents_depth = -1  # the array ended: nothing later is an agent
                self._depth -= 1
        self._offset = len(text)
        return found


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


@dataclass
class ReadyAgent:
    """An agent that may start now: its spec as the finished plan will have it, its layer, its remaining path so far."""

    agent_id: int
    spec: AgentSpec
    layer: int
    priority: float


@dataclass
class StreamedPlan:
    """The agents of a plan being written, and which of them may start (each exactly once).

    `feed` takes pieces of the coordinator's answer and returns the agents that became safe to
    start; `spoiled` is set as soon as the answer cannot become a valid plan (an agent that fails
    validation, more agents than allowed): nothing more starts from it.
    """

    max_agents: int
    agents: list[AgentSpec | None] = field(default_factory=list)  # None: an object that is not a valid agent
    started: dict[int, AgentSpec] = field(default_factory=dict)
    layer_of: dict[int, int] = field(default_factory=dict)
    spoiled: str | None = None
    _objects: AgentObjects = field(default_factory=AgentObjects)
    _graph: nx.DiGraph = field(default_factory=nx.DiGraph)  # an edge from each known dependency to its dependent

    def feed(self, piece: str) -> list[ReadyAgent]:
        if self.spoiled is not None:
            return []
        objects = self._objects.feed(piece)
        for data in objects:
            self.agents.append(self._spec(data, len(self.agents)))
            if self.spoiled is not None:
                return []
        return self._ready() if objects else []  # only a new agent can make one ready

    def _spec(self, data: object, index: int) -> AgentSpec | None:
        if (too_many := too_many_agents(index + 1, self.max_agents)) is not None:
            self.spoiled = too_many
            return None
        try:
            spec = AgentSpec.model_validate(data)
        except ValidationError as error:
            self.spoiled = f"agent {index} is not valid ({error.errors()[0]['msg']})"
            return None
        # The same cleaning the whole plan gets, for the dependencies it can already judge.
        self._graph.add_node(index)
        spec.depends_on, _ = clean_dependencies(index, spec.depends_on, count=None)
        self._graph.add_edges_from((dep, index) for dep in spec.depends_on)
        return spec

    def _ready(self) -> list[ReadyAgent]:
        """Agents not started whose dependencies have all started (so none of them waits on a cycle)."""
        ready: list[ReadyAgent] = []
        progress = True
        while progress:
            progress = False
            for index, spec in enumerate(self.agents):
                if spec is None or index in self.started or not all(dep in self.started for dep in spec.depends_on):
                    continue
                self.started[index] = spec
                self.layer_of[index] = 1 + max((self.layer_of[dep] for dep in spec.depends_on), default=-1)
                ready.append(ReadyAgent(index, spec, self.layer_of[index], priority=1))
                progress = True
        if not ready:
            return ready
        # The remaining path among the agents known so far: one not written yet is in the graph only as the
        # start of an edge to an agent that names it, so it never lies after these.
        remaining = remaining_path(self._graph, of=[agent.agent_id for agent in ready])
        for agent in ready:
            agent.priority = remaining[agent.agent_id]
        return ready

    def discard(self, reason: str) -> None:
        """The coordinator's answer failed validation: nothing more starts from it."""
        self.spoiled = self.spoiled or reason

    def disagreement(self, plan: ExecutionPlan) -> str | None:
        """Why the agents started early cannot stay in the finished plan, or None when they can."""
        if self.spoiled is not None:
            return self.spoiled
        if plan.cycle is not None:
            return "the finished plan has a cycle"
        for index, spec in self.started.items():
            if index >= len(plan.agents) or plan.agents[index] != spec:
                return f"agent {index} differs in the finished plan"
        return None
