"""Typed events of a run, so views (the terminal, tests, other tools) need not know about Ray."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Union

from .paths import ROOT, AgentPath
from .plan import ExecutionPlan
from .record import AgentRecord, RunRecord, valid_text


@dataclass(frozen=True)
class Notice:
    """Something the user should know that is not an agent's progress (backend chosen, warnings)."""

    text: str
    warning: bool = False


@dataclass(frozen=True)
class PlanningStarted:
    """The coordinator LLM was asked for a plan; `PlanReady` follows once the plan runs."""

    llm: str  # the backend, as it describes itself


@dataclass(frozen=True)
class RayStarting:
    """The run starts Ray (or connects to a cluster): seconds of start-up before any agent can run."""

    address: str | None  # the cluster's address, None for embedded Ray


@dataclass(frozen=True)
class PlanReady:
    """The plan is clean and about to run: the layers are what users see, not what Ray waits on."""

    plan: ExecutionPlan
    layers: list[list[int]]
    run_dir: str | None
    slots: int | None = None  # how many agents may call an LLM at once, when known
    reused: tuple[int, ...] = ()  # agents whose earlier results a resume reuses: they will not run
    rounds: tuple[int, ...] = ()  # each agent's round, when a resumed run had several (`--replan`)


@dataclass(frozen=True)
class SubPlanReady:
    """An agent delegated its task: this sub-plan's agents (paths "2.0", "2.1", ...) run for it."""

    path: AgentPath
    query: str  # the request the sub-plan's agents work on
    plan: ExecutionPlan
    layers: list[list[int]]


@dataclass(frozen=True)
class RoundStarted:
    """The joiner read the results and replanned (`--replan`): round `number` adds agents `added` to the plan."""

    number: int  # 2 for the first replan
    reason: str  # the joiner's
    plan: ExecutionPlan  # the run's plan, the new agents after the old
    layers: list[list[int]]
    added: list[int]


@dataclass(frozen=True)
class AgentStarted:
    """An agent's task began on a Ray worker (`attempt` > 1 when Ray ran it again after a crash)."""

    path: AgentPath  # "2", or "2.1" for agent 1 of agent 2's sub-plan
    role: str
    attempt: int
    pid: int  # the worker process, 0 when unknown
    node: str = ""  # the Ray node id, "" when unknown


@dataclass(frozen=True)
class AgentFinished:
    """An agent has its final result (for a delegating agent: once its sub-plan finished)."""

    agent: AgentRecord


@dataclass(frozen=True)
class TokensArrived:
    """Part of an answer arrived from a streaming backend: `tokens` so far, and the `text` since the last event."""

    path: AgentPath  # an agent's path, or COORDINATOR
    tokens: int
    text: str


@dataclass(frozen=True)
class RunFinished:
    record: RunRecord


Event = Union[
    Notice, PlanningStarted, RayStarting, PlanReady, SubPlanReady, RoundStarted, AgentStarted, TokensArrived, AgentFinished, RunFinished
]
EventHandler = Callable[[Event], None]
COORDINATOR = ROOT  # the path of the run's coordinator's tokens: the run itself
TOKEN_EVENT_INTERVAL_S = 0.2  # at most one TokensArrived per answer this often


class TokenCounter:
    """Counts a streamed answer's pieces and publishes them as `TokensArrived`, at most every TOKEN_EVENT_INTERVAL_S.

    Pass it as an `LLMRequest.on_text`; each piece a backend streams is one token (Ollama, llama.cpp
    and OpenAI-compatible servers stream one token per piece; the fake backend one word).
    """

    def __init__(self, path: AgentPath, publish: Callable[[TokensArrived], object]) -> None:
        self.path = path
        self.publish = publish
        self.tokens = 0
        self._unsent: list[str] = []
        self._last_sent = time.monotonic()

    def __call__(self, piece: str) -> None:
        self.tokens += 1
        self._unsent.append(valid_text(piece))
        now = time.monotonic()
        if now - self._last_sent >= TOKEN_EVENT_INTERVAL_S:
            self.publish(TokensArrived(path=self.path, tokens=self.tokens, text="".join(self._unsent)))
            self._unsent.clear()
            self._last_sent = now


def ignore(event: Event) -> None:
    """The handler for callers who do not watch a run."""
