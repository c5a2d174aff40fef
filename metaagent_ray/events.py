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
    """An agent's task began on a Ray worker (`attempt` > 1 when Ray ran it again after a crash)."""

    path: str  # "2", or "2.1" for agent 1 of agent 2's sub-plan
    role: str
    attempt: int
    pid: int  # the worker process, 0 when unknown

    @property
    def agent_id(self) -> int:
        return int(self.path.rsplit(".", 1)[-1])


@dataclass(frozen=True)
class AgentFinished:
    """An agent has its final result (for a delegating agent: once its sub-plan finished)."""

    agent: AgentRecord


@dataclass(frozen=True)
class RunFinished:
    record: RunRecord


Event = Union[Notice, PlanReady, AgentStarted, AgentFinished, RunFinished]
EventHandler = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The handler for callers who do not watch a run."""
