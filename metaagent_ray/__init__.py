"""metaagent-ray: a coordinator LLM plans a task as a graph of role-based agents; Ray runs each
agent the moment its own dependencies are done.

The public names load on first use (PEP 562), so that `metaagent` can take over Ctrl-C before
Ray and the rest load (see `__main__`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
        RoundStarted,
        RunFinished,
        SubPlanReady,
        TokensArrived,
    )
    from .llm import LLMConfig, Usage
    from .paths import AgentPath
    from .plan import AgentSpec, ExecutionPlan, Role
    from .record import AgentRecord, FailureKind, RunRecord
    from .stops import RunInterrupted
    from .version import __version__

__all__ = [
    "AgentFinished",
    "AgentPath",
    "AgentRecord",
    "AgentSpec",
    "AgentStarted",
    "ConfigError",
    "Event",
    "ExecutionPlan",
    "FailureKind",
    "LLMConfig",
    "MetaAgent",
    "MetaAgentError",
    "Notice",
    "PlanError",
    "PlanReady",
    "PlanningStarted",
    "RayStarting",
    "Role",
    "RoundStarted",
    "RunFinished",
    "RunInterrupted",
    "RunRecord",
    "SubPlanReady",
    "TokensArrived",
    "Usage",
    "__version__",
    "load_plan",
    "parse_plan",
]
_DEFINED_IN = ("api", "errors", "events", "llm", "paths", "plan", "record", "stops", "version")  # the modules the names above come from


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for module_name in _DEFINED_IN:
        module = importlib.import_module(f".{module_name}", __name__)
        if hasattr(module, name):
            globals()[name] = value = getattr(module, name)
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
