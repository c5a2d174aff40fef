"""metaagent-ray: a coordinator LLM plans a task as a graph of role-based agents; Ray runs each
agent the moment its own dependencies are done."""

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
from .version import __version__

__all__ = [
    "AgentFinished",
    "AgentRecord",
    "AgentSpec",
    "AgentStarted",
    "ConfigError",
    "Event",
    "ExecutionPlan",
    "LLMConfig",
    "MetaAgent",
    "MetaAgentError",
    "Notice",
    "PlanError",
    "PlanReady",
    "PlanningStarted",
    "RayStarting",
    "Role",
    "RunFinished",
    "RunInterrupted",
    "RunRecord",
    "SubPlanReady",
    "TokensArrived",
    "__version__",
    "load_plan",
    "parse_plan",
]
