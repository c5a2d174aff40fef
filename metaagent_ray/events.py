"""Typed events of a run, so views (the terminal, tests, other tools) need not know about Ray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from .plan import ExecutionPlan
from .record import AgentRecord, RunRecord


@dataclass(frozen=True)
class Notice:
    """Something the user should know that is not an agent's progress (backend chosen, warnings)."""

    text: str
    warning: bool = False


@dataclass(frozen=True)
class PlanReady:
    """The plan is clean and about to run: the layers are what users see, not what Ray waits on."""

    plan: ExecutionPlan
    layers: list[list[int]]
    run_dir: str | None


@dataclass(frozen=True)
class AgentStarted:
    """An agent's task began on a Ray worker (`attempt` > 1 when Ray retried it)."""

    agent_id: int
    role: str
    attempt: int


@dataclass(frozen=True)
class AgentFinished:
    agent: AgentRecord


@dataclass(frozen=True)
class RunFinished:
    record: RunRecord


Event = Union[Notice, PlanReady, AgentStarted, AgentFinished, RunFinished]
EventHandler = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The handler for callers who do not watch a run."""
