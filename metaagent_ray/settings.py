"""How to run: `RunSettings`, every option of a run with its one default.

The API takes these settings, the limits agents and the runtime work under are made from them
(`RunSettings.limits`), the CLI's help shows their defaults, and the slot count is capped by the default
agent limit (resources.py). The record stores them, so `resume` runs alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .llm import CALL_TIMEOUT_S
from .llm.bounds import AnswerBudget, AnswerBudgets
from .plan import Role
from .serving import ServeLLMSpec

FailurePolicy = Literal["continue", "stop"]  # what an agent does when an input failed: run without it, or skip
INJECTED_FAULTS = "fail"  # the fake backend's fault-injection option: never stored for a resume
SECRET_WORDS = ("key", "token", "secret", "password")  # a backend option named with one is never stored: records are shared


def default_answer_tokens() -> AnswerBudgets:
    """Every answer's token budget unless --max-tokens is given (llm/bounds.py), by prompt style.

    A base model ("document") writes until it is stopped: an agent gets a paragraph, the length of
    its role's worked example, and the plan what the default model's plans take (139 tokens for the
    README's request's 4 agents) with room to spare. An instruct model ("chat") ends its answer on
    its own: its budgets only stop one that runs on, at several times a concise answer.
    """
    document = {
        Role.RESEARCHER: 128,
        Role.ANALYZER: 160,
        Role.PLANNER: 160,
        Role.WRITER: 192,
        Role.CRITIC: 128,
        Role.SYNTHESIZER: 192,
        Role.COORDINATOR: 160,
    }
    return AnswerBudgets(
        chat=AnswerBudget(plan=2048, roles={role: 4 * tokens for role, tokens in document.items()}),
        document=AnswerBudget(plan=384, roles=document),
    )


@dataclass(frozen=True)
class Limits:
    """How hard each agent tries, how far it may recurse, and how many agents the whole run may have.

    Sent with every agent; made from a run's settings (`RunSettings.limits`), so no defaults here.
    """

    retries: int
    call_timeout: float | None
    max_tokens: int | None  # every answer's budget (--max-tokens); None: `answer_tokens`'s, by style and role
    answer_tokens: AnswerBudgets
    on_failure: FailurePolicy
    max_depth: int
    max_agents: int  # in one plan
    max_total_agents: int  # in the run, sub-plans included


class RunSettings(BaseModel):
    """How to run: backend, resources and limits. Stored in the record, so `resume` can run alike."""

    model_config = ConfigDict(extra="forbid")

    llm: str = "auto"
    model: str | None = None
    llm_options: dict[str, Any] = Field(default_factory=dict)
    slots: int | None = Field(default=None, ge=1)
    address: str | None = None
    retries: int = Field(default=2, ge=0, le=10)
    agent_timeout: float | None = Field(default=CALL_TIMEOUT_S, gt=0)
    on_failure: FailurePolicy = "continue"
    max_depth: int = Field(default=2, ge=0)
    max_agents: int = Field(default=64, ge=1)
    max_total_agents: int = Field(default=200, ge=1)
    replan: int = Field(default=0, ge=0, le=10)  # rounds the joiner may add after reading the agents' results
    max_tokens: int | None = Field(default=None, ge=1)  # every agent's answer budget; None: answer_tokens'
    answer_tokens: AnswerBudgets = Field(default_factory=default_answer_tokens)
    serve_llm: ServeLLMSpec | None = None  # serve the model from these Ray Serve replicas (serve_llm.py); agents call them through `openai`
    otel: bool = False  # export the run as an OpenTelemetry trace (also on when OTEL_EXPORTER_OTLP_ENDPOINT is set; tracing.py)

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of one setting, e.g. for the CLI's help."""
        return cls.model_fields[name].default

    def limits(self) -> Limits:
        """The limits the run and its agents work under."""
        return Limits(
            retries=self.retries,
            call_timeout=self.agent_timeout,
            max_tokens=self.max_tokens,
            answer_tokens=self.answer_tokens,
            on_failure=self.on_failure,
            max_depth=self.max_depth,
            max_agents=self.max_agents,
            max_total_agents=self.max_total_agents,
        )

    def stored(self) -> dict[str, Any]:
        """What a resume may reuse: everything but injected faults and secrets (an API key comes again from its variable)."""
        options = {
            key: value
            for key, value in self.llm_options.items()
            if key != INJECTED_FAULTS and not any(word in key.lower() for word in SECRET_WORDS)
        }
        return self.model_copy(update={"llm_options": options}).model_dump()
