"""The Ollama backend: a local model server reached through the official `ollama` client.

Failures are sorted here, at the edge: a server that is down, slow or failing (connection, timeout,
HTTP 5xx) is transient and worth a retry; a missing model or a rejected request is not. `check()`
turns the two usual set-up mistakes (no server, model not pulled) into one line that says how to
fix them, before any agent runs. Each call's token budget and stop sequences (llm/bounds.py) go as
the model options `num_predict` and `stop`. The footprint it states for the slot count is the server's: how
many requests it answers at once (OLLAMA_NUM_PARALLEL), and the model's size for the GPU lines.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterator

import httpx
import ollama
from pydantic import BaseModel, ConfigDict, Field

from .base import (
    CALL_TIMEOUT_S,
    LLM,
    LLMConfig,
    LLMError,
    LLMRequest,
    LLMResponse,
    LLMUnavailable,
    ModelFootprint,
    PromptStyle,
    TextCallback,
    check_model_request,
    parse_options,
    size,
)

DEFAULT_MODEL = "llama3.2:1b"
DEFAULT_HOST = "http://127.0.0.1:11434"  # the official client's default
CHECK_TIMEOUT = 5.0  # seconds for the pre-flight check: a local server answers /api/tags at once


class OllamaOptions(BaseModel):
    """The backend's options (`LLMConfig.options`); unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    host: str | None = None  # None: $OLLAMA_HOST, else DEFAULT_HOST
    timeout: float = Field(default=CALL_TIMEOUT_S, gt=0)
    num_predict: int | None = Field(default=None, gt=0)  # used when a request gives no max_tokens
    temperature: float | None = Field(default=None, ge=0)


def resolve_host(host: str | None) -> str:
    """The server to use: the given host, else $OLLAMA_HOST, else the client's default."""
    return host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST


def _full_name(model: str) -> str:
    """Ollama names a model without a tag `name:latest`; compare names in that form."""
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


def _listed_model(host: str, model: str, timeout: float) -> ollama.ListResponse.Model:
    """The server's entry for `model`; LLMUnavailable with the fix when the server or the model is missing."""
    check_model_request("ollama", host)
    with ollama.Client(host=host, timeout=timeout) as client:
        try:
            models = client.list().models
        except ConnectionError:
            raise LLMUnavailable(
                f"cannot reach Ollama at {host}: start it with `ollama serve` (or set OLLAMA_HOST / --ollama-host)"
            ) from None
        except httpx.TransportError as error:
            raise LLMUnavailable(
                f"cannot reach Ollama at {host} ({type(error).__name__}: {error or 'no answer'}): "
                "start it with `ollama serve` (or set OLLAMA_HOST / --ollama-host)"
            ) from None
        except (ollama.ResponseError, ValueError) as error:
            raise LLMUnavailable(f"Ollama at {host} could not list its models ({error}): is it an Ollama server?") from None
    wanted = _full_name(model)
    for entry in models:
        if entry.model and _full_name(entry.model) == wanted:
            return entry
    raise LLMUnavailable(f"model {model} is not pulled on {host}: run `ollama pull {model}`")


def server_has_model(host: str | None = None, model: str = DEFAULT_MODEL, timeout: float = CHECK_TIMEOUT) -> bool:
    """Whether an Ollama server answers at `host` (None: $OLLAMA_HOST or the default) with `model` pulled.

    For choosers such as `--llm auto`: never raises, a missing server or model is just False.
    """
    try:
        _listed_model(resolve_host(host), model, timeout)
    except LLMUnavailable:
        return False
    return True


class OllamaLLM(LLM):
    """Chat completions from one model on one Ollama server; JSON schemas become structured outputs."""

    delegates = True  # instruct models decide when a task needs a team
    prompt_style: PromptStyle = "chat"

    def __init__(self, model: str, options: OllamaOptions) -> None:
        self.model = model
        self.options = options
        self.host = resolve_host(options.host)

    def describe(self) -> str:
        return f"ollama {self.model} at {self.host}"

    def check(self) -> None:
        """Fail fast, with the fix, when the server is down or the model is not pulled."""
        _listed_model(self.host, self.model, min(CHECK_TIMEOUT, self.options.timeout))

    def footprint(self) -> ModelFootprint:
        """The server holds the model once, whatever the slot count; its parallelism bounds the slots."""
        model_bytes = int(_listed_model(self.host, self.model, min(CHECK_TIMEOUT, self.options.timeout)).size or 0)
        parallel, why = server_parallel()
        return ModelFootprint(
            source=(
                f"ollama {self.model} at {self.host}: {size(model_bytes)} as the server reports it, loaded once by the "
                "server for every request; each parallel request adds a context cache the server sizes itself"
            ),
            instance_bytes=0,
            server_parallel=parallel,
            server_parallel_reason=why,
            gpu_model_bytes=model_bytes,
        )

    def complete(self, request: LLMRequest) -> LLMResponse:
        num_predict = request.max_tokens if request.max_tokens is not None else self.options.num_predict
        given = {"num_predict": num_predict, "stop": list(request.stop) or None, "temperature": self.options.temperature}
        model_options = {key: value for key, value in given.items() if value is not None}
        timeout = min(self.options.timeout, request.timeout or self.options.timeout)
        arguments: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": message.role, "content": message.content} for message in request.messages],
            "format": request.json_schema,
            "options": model_options or None,
        }
        check_model_request("ollama", self.host)
        started = time.perf_counter()
        try:  # a client per call: the official client takes its timeout only when it is made
            with ollama.Client(host=self.host, timeout=timeout) as client:
                if request.on_text is None:
                    response = client.chat(**arguments, stream=False)
                else:
                    response = _streamed(client.chat(**arguments, stream=True), request.on_text)
        except (ConnectionError, httpx.TransportError, ollama.ResponseError, ValueError) as error:
            raise self._call_error(error, timeout) from error
        llm_ms = response.total_duration / 1e6 if response.total_duration is not None else (time.perf_counter() - started) * 1000
        return LLMResponse(
            text=response.message.content or "",
            prompt_tokens=response.prompt_eval_count,
            completion_tokens=response.eval_count,
            llm_ms=llm_ms,
            finish_reason=response.done_reason,
        )

    def _call_error(self, error: Exception, timeout: float) -> LLMError:
        """Sort a failed call: transient when retrying may help, permanent when it cannot."""
        where = f"Ollama at {self.host}"
        if isinstance(error, ConnectionError):
            return LLMError(f"cannot reach {where}: is `ollama serve` running?", transient=True)
        if isinstance(error, httpx.TimeoutException):
            return LLMError(f"{where} did not answer within {timeout:g} s", transient=True)
        if isinstance(error, httpx.TransportError):
            return LLMError(f"connection to {where} failed: {error or type(error).__name__}", transient=True)
        if isinstance(error, ollama.ResponseError):
            if error.status_code == 404:
                return LLMError(f"{where}: {error.error} (HTTP 404): run `ollama pull {self.model}`", transient=False)
            transient = error.status_code >= 500 or error.status_code == 429
            return LLMError(f"{where} answered HTTP {error.status_code}: {error.error}", transient=transient)
        # a ValueError: a body that is not JSON, or JSON that is not a chat response
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        return LLMError(f"{where} sent a malformed response: {first_line}", transient=False)


def _streamed(chunks: Iterator[ollama.ChatResponse], on_text: TextCallback) -> ollama.ChatResponse:
    """Hand each streamed token to `on_text`; returns the last chunk (which holds the counts) with the whole answer."""
    parts: list[str] = []
    last: ollama.ChatResponse | None = None
    for last in chunks:
        piece = last.message.content or ""
        if piece:
            parts.append(piece)
            on_text(piece)
    if last is None:
        raise ValueError("the server closed the stream without an answer")
    return last.model_copy(update={"message": last.message.model_copy(update={"content": "".join(parts)})})


def server_parallel() -> tuple[int, str]:
    """How many requests the Ollama server answers at once, as far as this environment can tell."""
    value = os.environ.get("OLLAMA_NUM_PARALLEL", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value), f"OLLAMA_NUM_PARALLEL={value} here (the server's own setting is what counts: start it with the same)"
    return 1, (
        "OLLAMA_NUM_PARALLEL is not set here: an Ollama server answers 1 request per model at a time by default, "
        "and further requests only queue there (start `ollama serve` with OLLAMA_NUM_PARALLEL=N, and set it here too)"
    )


def create(config: LLMConfig) -> OllamaLLM:
    return OllamaLLM(model=config.model or DEFAULT_MODEL, options=parse_options("ollama", OllamaOptions, config.options))
