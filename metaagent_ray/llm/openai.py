"""The `openai` backend: any OpenAI-compatible chat server, such as vLLM or llama.cpp's llama-server.

One POST to `{base_url}/chat/completions` per call, through httpx (already installed with the
`ollama` client). A JSON schema becomes `response_format: {"type": "json_schema", ...}`, which vLLM
and llama-server both turn into constrained decoding. Failures are sorted as in the Ollama backend:
no connection, a timeout, HTTP 429 or 5xx are transient; any other 4xx or a malformed answer is not.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from .base import (
    CALL_TIMEOUT_S,
    LLMConfig,
    LLMError,
    LLMRequest,
    LLMResponse,
    LLMUnavailable,
    ModelFootprint,
    PromptStyle,
    TextCallback,
    check_model_request,
    no_model_footprint,
    parse_options,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"  # `vllm serve`'s default port
DEFAULT_API_KEY = "none"  # local servers accept any key unless started with one
CHECK_TIMEOUT = 5.0  # seconds for the pre-flight check
START_HINT = "start one, e.g. `vllm serve MODEL --port 8000` or `llama-server -m MODEL.gguf --port 8000` (or set OPENAI_BASE_URL)"


class OpenAIOptions(BaseModel):
    """The backend's options (`LLMConfig.options`); unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = None  # None: $OPENAI_BASE_URL, else DEFAULT_BASE_URL
    api_key: str | None = None  # None: $OPENAI_API_KEY, else DEFAULT_API_KEY
    timeout: float = Field(default=CALL_TIMEOUT_S, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)  # used when a request gives none
    temperature: float | None = Field(default=None, ge=0)


def _error_message(response: httpx.Response) -> str:
    """The server's own words: OpenAI and llama-server nest them under "error", vLLM may not."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200] or response.reason_phrase
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


class OpenAILLM:
    """Chat completions from one model on one OpenAI-compatible server.

    With no model given, it uses the first model the server lists (llama-server serves exactly one).
    """

    delegates = True  # instruct models decide when a task needs a team
    prompt_style: PromptStyle = "chat"

    def __init__(self, model: str | None, options: OpenAIOptions) -> None:
        self.options = options
        self.base_url = (options.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        api_key = options.api_key or os.environ.get("OPENAI_API_KEY") or DEFAULT_API_KEY
        self._model = model
        self._client = httpx.Client(timeout=options.timeout, headers={"Authorization": f"Bearer {api_key}"})

    def describe(self) -> str:
        return f"openai {self._model or '(the served model)'} at {self.base_url}"

    def check(self) -> None:
        """Fail fast, with the fix, when the server is down or does not serve the model."""
        served = self._served_models()
        if self._model is not None and self._model not in served:
            raise LLMUnavailable(
                f"the server at {self.base_url} serves {', '.join(served) or 'no model'}, not {self._model}: "
                "start it with that model or choose one it serves"
            )

    def footprint(self) -> ModelFootprint:
        return no_model_footprint("openai", f"on the server at {self.base_url}")

    def _served_models(self) -> list[str]:
        where = f"an OpenAI-compatible server at {self.base_url}"
        check_model_request("openai", self.base_url)
        try:
            response = self._client.get(f"{self.base_url}/models", timeout=min(CHECK_TIMEOUT, self.options.timeout))
        except httpx.TransportError as error:
            raise LLMUnavailable(f"cannot reach {where} ({type(error).__name__}): {START_HINT}") from None
        if response.status_code in (401, 403):
            raise LLMUnavailable(f"{where} refused the API key (HTTP {response.status_code}): set OPENAI_API_KEY")
        if response.status_code != 200:
            raise LLMUnavailable(f"{where} could not list its models (HTTP {response.status_code}: {_error_message(response)})")
        try:
            return [str(entry["id"]) for entry in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise LLMUnavailable(f"{where} sent a malformed model list: is it an OpenAI-compatible server?") from None

    def _model_name(self) -> str:
        if self._model is None:
            served = self._served_models()
            if not served:
                raise LLMError(f"the server at {self.base_url} serves no model", transient=False)
            self._model = served[0]
        return self._model

    def complete(self, request: LLMRequest) -> LLMResponse:
        body: dict[str, Any] = {
            "model": self._model_name(),
            "messages": [{"role": message.role, "content": message.content} for message in request.messages],
        }
        max_tokens = request.max_tokens if request.max_tokens is not None else self.options.max_tokens
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if self.options.temperature is not None:
            body["temperature"] = self.options.temperature
        if request.json_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "plan", "schema": request.json_schema}}
        timeout = request.timeout if request.timeout is not None else self.options.timeout
        check_model_request("openai", self.base_url)
        started = time.perf_counter()
        if request.on_text is not None:
            body["stream"], body["stream_options"] = True, {"include_usage": True}
        try:
            with self._client.stream("POST", f"{self.base_url}/chat/completions", json=body, timeout=timeout) as response:
                if response.status_code != 200:
                    response.read()
                    transient = response.status_code >= 500 or response.status_code == 429
                    message = f"the server at {self.base_url} answered HTTP {response.status_code}: {_error_message(response)}"
                    raise LLMError(message, transient=transient)
                text, usage = self._answer(response, request.on_text)
        except httpx.TransportError as error:
            raise self._transport_error(error, timeout) from error
        llm_ms = (time.perf_counter() - started) * 1000
        return LLMResponse(
            text=text,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            llm_ms=llm_ms,
        )

    def _answer(self, response: httpx.Response, on_text: TextCallback | None) -> tuple[str, dict[str, Any]]:
        """The answer and its usage block: from server-sent events as they arrive, or from one JSON body."""
        try:
            if on_text is None or not response.headers.get("content-type", "").startswith("text/event-stream"):
                data = json.loads(response.read())
                return data["choices"][0]["message"]["content"] or "", data.get("usage") or {}
            parts: list[str] = []
            usage: dict[str, Any] = {}
            ended = False  # the stream's last event is [DONE]: without it the connection closed mid-answer
            for line in response.iter_lines():
                if line.strip() == "data: [DONE]":
                    ended = True
                if not line.startswith("data:") or ended:
                    continue
                event = json.loads(line.removeprefix("data:"))
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        parts.append(piece)
                        on_text(piece)
            if not ended:
                raise LLMError(f"the server at {self.base_url} closed the stream before the answer's end", transient=True)
            return "".join(parts), usage
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
            raise LLMError(f"the server at {self.base_url} sent a malformed response ({type(error).__name__})", transient=False) from error

    def _transport_error(self, error: httpx.TransportError, timeout: float) -> LLMError:
        """No answer at all is always worth a retry: the server may be restarting or busy."""
        where = f"the server at {self.base_url}"
        if isinstance(error, httpx.ConnectError):
            return LLMError(f"cannot reach {where}: is it running? ({START_HINT})", transient=True)
        if isinstance(error, httpx.TimeoutException):
            return LLMError(f"{where} did not answer within {timeout:g} s", transient=True)
        return LLMError(f"connection to {where} failed: {error or type(error).__name__}", transient=True)


def create(config: LLMConfig) -> OpenAILLM:
    return OpenAILLM(model=config.model, options=parse_options("openai", OpenAIOptions, config.options))
