"""The `openai` backend: any OpenAI-compatible server, such as vLLM or llama.cpp's llama-server.

One POST per call, through httpx (already installed with the `ollama` client), with the request's
token budget and stop sequences (llm/bounds.py). An instruct model gets `{base_url}/chat/completions`;
a JSON schema becomes `response_format: {"type": "json_schema", ...}`, which vLLM and llama-server
both turn into constrained decoding. A model without a chat template (a base model) gets the document
prompts over `{base_url}/completions` instead, as the `local` backend gives them (llama_server.py):
chat requests would reach it through a template it does not know. Option `prompt_style` says which;
"auto" asks the server: llama-server's `/props` names the model's template (its built-in ChatML
fallback when the model has none), and a server without `/props` gets chat.

Failures are sorted as in the Ollama backend: no connection, a timeout, HTTP 429 or 5xx are
transient; any other 4xx or a malformed answer is not.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Literal

import httpx
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
    no_model_footprint,
    parse_options,
)
from .llama_server import completion_prompt, json_schema_field, lacks_chat_template
from .streaming import AnswerStream

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
    prompt_style: Literal["auto", "chat", "document"] = "auto"  # auto: document when /props shows a model without a chat template


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


class OpenAILLM(LLM):
    """Completions from one model on one OpenAI-compatible server: chat, or documents for a base model.

    With no model given, it uses the first model the server lists (llama-server serves exactly one).
    """

    def __init__(self, model: str | None, options: OpenAIOptions) -> None:
        self.options = options
        self.base_url = (options.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        api_key = options.api_key or os.environ.get("OPENAI_API_KEY") or DEFAULT_API_KEY
        self._model = model
        self._client = httpx.Client(timeout=options.timeout, headers={"Authorization": f"Bearer {api_key}"})
        self._style: PromptStyle | None = None if options.prompt_style == "auto" else options.prompt_style

    @property
    def prompt_style(self) -> PromptStyle:
        """Chat, or "document" for a model without a chat template: as the option says, else as the server shows (once)."""
        if self._style is None:
            detected = self._detect_style()
            if detected is None:  # no answer now: chat, and ask again next time
                return "chat"
            self._style = detected
        return self._style

    @property
    def delegates(self) -> bool:
        """Instruct models decide when a task needs a team; a base model copies the offer into its answer (as in the local backend)."""
        return self.prompt_style == "chat"

    def _detect_style(self) -> PromptStyle | None:
        """The style the server shows: "document" when it is llama.cpp's and its model has no chat template of its
        own; "chat" for any other answer to `/props` (a server without it: vLLM, Ollama; a model with one); None
        when it did not answer."""
        check_model_request("openai", self.base_url)
        try:
            response = self._client.get(f"{self.base_url.removesuffix('/v1')}/props", timeout=min(CHECK_TIMEOUT, self.options.timeout))
        except httpx.TransportError:
            return None
        try:
            props = response.json() if response.status_code == 200 else None
        except ValueError:
            props = None
        return "document" if lacks_chat_template(props) else "chat"

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
        path, body = self._request_body(request)
        timeout = request.timeout if request.timeout is not None else self.options.timeout
        check_model_request("openai", self.base_url)
        started = time.perf_counter()
        if request.on_text is not None:
            body["stream"], body["stream_options"] = True, {"include_usage": True}
        try:
            with self._client.stream("POST", f"{self.base_url}{path}", json=body, timeout=timeout) as response:
                if response.status_code != 200:
                    response.read()
                    transient = response.status_code >= 500 or response.status_code == 429
                    message = f"the server at {self.base_url} answered HTTP {response.status_code}: {_error_message(response)}"
                    if "chat template" in message:  # vLLM refuses chat for a model without one
                        message += " (for a model without a chat template, use --prompt-style document)"
                    raise LLMError(message, transient=transient)
                text, usage, finish = self._answer(response, request.on_text)
        except httpx.TransportError as error:
            raise self._transport_error(error, timeout) from error
        llm_ms = (time.perf_counter() - started) * 1000
        return LLMResponse(
            text=text,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            llm_ms=llm_ms,
            finish_reason=finish,
        )

    def _request_body(self, request: LLMRequest) -> tuple[str, dict[str, Any]]:
        """The endpoint and the body for `request`: chat messages, or the document a model without a chat template continues."""
        body: dict[str, Any] = {"model": self._model_name()}
        max_tokens = request.max_tokens if request.max_tokens is not None else self.options.max_tokens
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if self.options.temperature is not None:
            body["temperature"] = self.options.temperature
        if request.json_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "plan", "schema": request.json_schema}}
        if self.prompt_style == "chat":
            messages = [{"role": message.role, "content": message.content} for message in request.messages]
            return "/chat/completions", {**body, "messages": messages, "stop": list(request.stop)}
        prompt, stop = completion_prompt(request)
        if request.json_schema is not None:  # llama-server's field for completions (it reads response_format for chat only)
            body["json_schema"] = json_schema_field(request.json_schema)
        return "/completions", {**body, "prompt": prompt, "stop": [*request.stop, *stop]}

    def _answer(self, response: httpx.Response, on_text: TextCallback | None) -> tuple[str, dict[str, Any], str | None]:
        """The answer, its usage block and why it ended: from server-sent events as they arrive, or from one
        JSON body. A chat answer is a choice's message (or delta), a completion's its text."""
        try:
            if on_text is None or not response.headers.get("content-type", "").startswith("text/event-stream"):
                data = json.loads(response.read())
                choice = data["choices"][0]
                text = choice["message"]["content"] if "message" in choice else choice["text"]
                return text or "", data.get("usage") or {}, choice.get("finish_reason")
            stream = AnswerStream()
            for line in response.iter_lines():
                if piece := stream.feed(line):
                    on_text(piece)
            if not stream.done:
                raise LLMError(f"the server at {self.base_url} closed the stream before the answer's end", transient=True)
            return stream.text, stream.usage, stream.finish_reason
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
