"""metaagent-ray: a coordinator LLM plans a task as a graph of role-based agents; Ray runs each
agent the moment its own dependencies are done.

The names below are loaded on first use (PEP 562), so `metaagent` can say "interrupted" for a
Ctrl-C that arrives while Ray and the rest still load (see `__main__`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module that defines it
_PUBLIC = {
    "AgentFinished": "events",
    "AgentRecord": "record",
    "AgentSpec": "plan",
    "AgentStarted": "events",
    "ConfigError": "errors",
    "Event": "events",
    "ExecutionPlan": "plan",
    "LLMConfig": "llm",
    "MetaAgent": "api",
    "MetaAgentError": "errors",
    "Notice": "events",
    "PlanError": "errors",
    "PlanReady": "events",
    "PlanningStarted": "events",
    "RayStarting": "events",
    "Role": "plan",
    "RunFinished": "events",
    "RunInterrupted": "runtime",
    "RunRecord": "record",
    "SubPlanReady": "events",
    "TokensArrived": "events",
    "load_plan": "api",
    "parse_plan": "api",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from .api import MetaAgent, load_plan, parse_plan
    from .errors import ConfigError, MetaAgentError, PlanError
    from .events import (
        AgentFinished,
        AgentStarted,
        Event,
        Notice,
        PlanningStarted,
        PlanReady,
        RayStarting,
        RunFinished,
        SubPlanReady,
        TokensArrived,
    )
    from .llm import LLMConfig
    from .plan import AgentSpec, ExecutionPlan, Role
    from .record import AgentRecord, RunRecord
    from .runtime import RunInterrupted
