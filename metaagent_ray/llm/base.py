"""The contract every LLM backend keeps, the types that cross it, and what every backend shares:
option validation, the footprint it states for the slot count, and the switch that forbids real models."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Protocol, TypeVar

from pydantic import BaseModel, Field, ValidationError

from ..errors import ConfigError, MetaAgentError
from .bounds import TEMPLATE_MARKERS

PromptStyle = Literal["chat", "document"]
CALL_TIMEOUT_S = 300.0  # seconds one LLM call may take unless told otherwise: a small model on a CPU can take minutes
MODEL_REQUESTS_ENV = "METAAGENT_ALLOW_MODEL_REQUESTS"
KiB = 1024
MiB = 1024**2
GiB = 1024**3
MB = 1000**2
Options = TypeVar("Options", bound=BaseModel)


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
    max_tokens: int | None = None  # runs always set it (llm/bounds.py); None: the backend's own default
    stop: tuple[str, ...] = TEMPLATE_MARKERS  # the answer ends before any of these; backends pass them to their servers
    attempt: int = 1  # 1 for the first try of this call, 2 for its first retry, ...
    timeout: float | None = None  # seconds this call may take; backends bound their own waits by it
    may_delegate: bool = False  # the prompt offers the agent to answer DELEGATE
    on_text: TextCallback | None = None  # when set, the backend streams: each piece of the answer as it arrives
    # Leading messages that are the same in every call of this kind (the coordinator's instructions):
    # a backend may keep the model's state for them across calls and runs instead of reading them again.
    cache_messages: int = 0


class Usage(BaseModel):
    """Tokens an LLM call (or several) cost, as the backend reported them."""

    prompt: int = 0
    completion: int = 0
    cached_prompt: int | None = None  # prompt tokens the model did not read again; only backends that say so

    def __add__(self, other: Usage) -> Usage:
        cached = None if self.cached_prompt is None and other.cached_prompt is None else (self.cached_prompt or 0) + (other.cached_prompt or 0)
        return Usage(prompt=self.prompt + other.prompt, completion=self.completion + other.completion, cached_prompt=cached)

    @property
    def total(self) -> int:
        return self.prompt + self.completion


@dataclass(frozen=True)
class LLMResponse:
    """The answer and what it cost, as the backend reports it."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    llm_ms: float | None = None
    cached_prompt_tokens: int | None = None  # prompt tokens the model did not have to read again
    finish_reason: str | None = None  # as the server says: "stop" (its end or a stop sequence), "length" (the budget)

    @property
    def usage(self) -> Usage | None:
        """What the call cost, when the backend says."""
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return Usage(prompt=self.prompt_tokens or 0, completion=self.completion_tokens or 0, cached_prompt=self.cached_prompt_tokens)


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


def parse_options(backend: str, model: type[Options], options: Mapping[str, Any]) -> Options:
    """A backend's options as its pydantic model (which forbids extra keys), or one ConfigError line naming the bad one."""
    try:
        return model.model_validate(options)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"{backend} backend: unknown option {where!r} (options: {', '.join(model.model_fields)})") from None
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{backend} backend: {f'option {where}: ' if where else ''}{message}") from None


def user_cache_dir(name: str) -> Path:
    """`~/.cache/metaagent-ray/<name>` (or under $XDG_CACHE_HOME): what backends keep between runs."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metaagent-ray" / name


def size(value: float) -> str:
    """Bytes as KiB below 1 MiB, MiB below 1 GiB, else GiB."""
    if abs(value) < MiB:
        return f"{value / KiB:.0f} KiB"
    return f"{value / MiB:.0f} MiB" if abs(value) < GiB else f"{value / GiB:.1f} GiB"


class ModelRequestsForbidden(MetaAgentError):
    """A backend was about to reach a real model while model requests are off (see `check_model_request`)."""


def check_model_request(backend: str, server: str | None = None) -> None:
    """Raise ModelRequestsForbidden unless this process may reach a real model (pydantic-ai's ALLOW_MODEL_REQUESTS).

    $METAAGENT_ALLOW_MODEL_REQUESTS decides: unset or "1", every model; "0", none; a comma-separated
    list of URL prefixes (after a "0" or not), only the servers whose URLs start with one of them:
    the tests' own stand-in servers, which are no models. A model in this process (`server` None,
    the local backend) is never on such a list. Backends that reach a model (local, ollama, openai)
    call this before every request, `check` included.
    """
    allowed = os.environ.get(MODEL_REQUESTS_ENV, "1").strip()
    if allowed == "1":
        return
    prefixes = [prefix.strip() for prefix in allowed.split(",") if prefix.strip() not in ("", "0")]
    if server is not None and any(server.startswith(prefix) for prefix in prefixes):
        return
    target = f"the model at {server}" if server is not None else "a model in this process"
    raise ModelRequestsForbidden(
        f"{backend} backend: model requests are off here ({MODEL_REQUESTS_ENV}={allowed}), so {target} may not be called: "
        "tests reach real models only when marked `model`, and stand-in servers only at the URLs they allow"
    )


class ModelFootprint(BaseModel):
    """What one instance of a backend costs on a node, as the backend states it for the slot formula (resources.py)."""

    source: str  # where the figures come from, in words
    instance_bytes: int  # RAM the model adds per parallel slot (a server's per-slot context cache); 0 when it runs elsewhere
    shared_bytes: int = 0  # RAM needed once for all instances (memory-mapped weights)
    slots_per_core: int | None = None  # CPU-bound backends: cores x this bound the slots
    server_parallel: int | None = None  # a server that answers at most this many requests at once
    server_parallel_reason: str = ""
    gpu_model_bytes: int | None = None  # a model a GPU would hold; None: the backend uses no GPU
    gpu_unused_reason: str = ""


def no_model_footprint(backend: str, where: str) -> ModelFootprint:
    """The footprint of a backend whose model lives elsewhere (`where`): only the agents that wait on it count."""
    return ModelFootprint(
        source=f"{backend}: the model runs {where}; only the agents' threads that wait on it are counted",
        instance_bytes=0,
        gpu_unused_reason=f"the model runs {where}",
    )


class LLM(Protocol):
    """A backend: answers requests; `check` fails fast with a fix when it cannot serve.

    `delegates` says whether its model can decide sensibly when to hand a task to a team: agents
    are offered DELEGATE only then. `prompt_style` is "chat" for instruct models (system and user
    messages) and "document" for base models, which continue one "document" message as text.
    Reading either starts nothing (it may read a model file, or ask a server what it serves).
    `needs_ray` says that its calls reach a Ray actor (the local model server), so the
    driver joins Ray before the coordinator's first call; a backend that subclasses LLM inherits
    False. `footprint` states what one instance costs on this node, for the slot count (resources.py).
    """

    delegates: bool
    prompt_style: PromptStyle
    needs_ray: bool = False

    def complete(self, request: LLMRequest) -> LLMResponse: ...

    def check(self) -> None: ...

    def describe(self) -> str: ...

    def footprint(self) -> ModelFootprint: ...
