"""The contract every LLM backend keeps, and the types that cross it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from ..errors import MetaAgentError

PromptStyle = Literal["chat", "document"]


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: str  # "system", "user" or "assistant"; "document" for a text a base model continues
    content: str


TextCallback = Callable[[str], None]


@dataclass(frozen=True)
class LLMRequest:
    """One call. `caller`, `agent_id`, `role` and `inputs_from` let test backends answer by identity."""

    messages: list[Message]
    caller: str  # "coordinator" or "agent"
    query: str = ""
    agent_id: int | None = None
    role: str | None = None
    task: str | None = None
    inputs_from: list[int] = field(default_factory=list)
    json_schema: dict[str, Any] | None = None  # constrain the answer to this JSON schema
    max_tokens: int | None = None
    attempt: int = 1  # 1 for the first try of this call, 2 for its first retry, ...
    timeout: float | None = None  # seconds this call may take; backends bound their own waits by it
    may_delegate: bool = False  # the prompt offers the agent to answer DELEGATE
    on_text: TextCallback | None = None  # when set, the backend streams: each piece of the answer as it arrives


@dataclass(frozen=True)
class LLMResponse:
    """The answer and what it cost, as the backend reports it."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    llm_ms: float | None = None


class LLMError(Exception):
    """A call failed. `transient` errors (connection, 5xx, timeout) are worth retrying."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class LLMUnavailable(MetaAgentError):
    """The backend cannot serve at all (no server, no model): say how to fix it before any agent runs."""


class LLMConfig(BaseModel):
    """Which backend to use and how: small, serializable, sent to every Ray worker."""

    backend: str = "fake"
    model: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    def cache_key(self) -> str:
        return self.model_dump_json()


@runtime_checkable
class LLM(Protocol):
    """A backend: answers requests; `check` fails fast with a fix when it cannot serve.

    `delegates` says whether its model can decide sensibly when to hand a task to a team: agents
    are offered DELEGATE only then. `prompt_style` is "chat" for instruct models (system and user
    messages) and "document" for base models, which continue one "document" message as text.
    """

    delegates: bool
    prompt_style: PromptStyle

    def complete(self, request: LLMRequest) -> LLMResponse: ...

    def check(self) -> None: ...

    def describe(self) -> str: ...
