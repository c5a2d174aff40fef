"""The `local` backend's client: an agent's request as a streamed HTTP request to its node's server.

`LocalLLM` is cheap: it knows the model file (whose chat template says chat or document prompts) and
how to find its server (`locate`), which it calls on its first request. What it sends: chat messages
for a model with a chat template, else the document the model continues (llama_server.py), with the
request's budget and stops; JSON-schema requests decode under the server's grammar for that schema,
so even the tiny default model emits JSON of the right shape. Answers stream: `astream` hands the
text so far to a callback as tokens arrive (llm/streaming.py reads the events).
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from typing import Any, Awaitable, Callable

import httpx

from ..base import (
    LLM,
    LLMError,
    LLMRequest,
    LLMResponse,
    LLMUnavailable,
    Message,
    ModelFootprint,
    PromptStyle,
    TextCallback,
    check_model_request,
)
from ..llama_server import completion_prompt, json_schema_field, shared_prefix
from ..streaming import AnswerStream, MalformedStream
from .model import ENGINE_PACKAGE, INSTALL_HINT, describe_model, has_chat_template, model_footprint, model_path
from .options import LocalOptions
from .prompt_states import PREFIX_SLOT, hold_prefix
from .server import ServerEndpoint

JSON_REDO_PENALTY = 1.15  # the repeat penalty of the second decode of a JSON answer that looped
# DRY's sequence breakers: llama.cpp matches each against every token of the vocabulary when a
# request's sampler is made, in the server's one decode loop, which stalls every slot meanwhile:
# with its four default breakers ("\n", ":", '"', "*") that took ~150 ms per request for Gemma's 262k
# tokens (the first token of 4 agents came ~0.6 s later than without DRY); with "\n" alone it came
# as early as without DRY (0.36-0.39 s against 0.36-0.50 s).
# An answer is a paragraph, so a new line is the one boundary a repeat must not be matched across.
DRY_SEQUENCE_BREAKERS = ["\n"]


class LocalLLM(LLM):
    """A client of a local server: `locate` says where it is, starting it if needed; the client calls
    it on its first request (and again after the server stopped answering), never before."""

    def __init__(self, model: str | None, options: LocalOptions, locate: Callable[[], ServerEndpoint]) -> None:
        self.model = model
        self.options = options
        self._locate = locate
        self._server: ServerEndpoint | None = None
        self._chat: bool | None = None  # whether the model has a chat template, once read
        self._reading = threading.Lock()  # an executor's first agents all ask at once: the file is read once

    def describe(self) -> str:
        return describe_model(self.model)

    @property
    def prompt_style(self) -> PromptStyle:
        """Instruct models (with a chat template) get chat messages; base models a document to continue."""
        return "chat" if self._chat_template() else "document"

    @property
    def delegates(self) -> bool:
        """Only instruct models are offered DELEGATE: the default base model answered the offer by
        copying it into its answer instead of using it (benchmarks/README.md, `quality.py`)."""
        return self._chat_template()

    def _chat_template(self) -> bool:
        """Whether the model has a chat template: read from its file (metadata cached per file), no server started."""
        with self._reading:
            if self._chat is None:
                self._chat = has_chat_template(model_path(self.model))
            return self._chat

    def check(self) -> None:
        if importlib.util.find_spec(ENGINE_PACKAGE) is None:
            raise LLMUnavailable(f"local backend: xllamacpp is not installed; {INSTALL_HINT}")
        model_path(self.model)
        check_model_request("local")

    def footprint(self) -> ModelFootprint:
        return model_footprint(self.model, self.options.n_ctx)

    def complete(self, request: LLMRequest) -> LLMResponse:
        """The blocking call agents make; `astream` is the same call for coroutines."""
        return asyncio.run(self.astream(request, _pieces(request.on_text) if request.on_text is not None else None))

    async def astream(self, request: LLMRequest, on_text: Callable[[str], Awaitable[None] | None] | None = None) -> LLMResponse:
        """Decode `request`, handing the answer so far to `on_text` as tokens arrive.

        A JSON answer that runs into the token limit is a loop (a string or a list that never ends):
        it is decoded once more with a repeat penalty, which breaks it; the text so far then starts
        again from the beginning.
        """
        check_model_request("local")
        # Once per process, and blocking, so not on the event loop: finding (or starting) the server, reading the model file.
        if self._server is None:
            self._server = await asyncio.to_thread(self._locate)
        server = self._server
        chat = self._chat if self._chat is not None else await asyncio.to_thread(self._chat_template)
        # JSON repeats its keys, roles and subjects by design: a repeat penalty pushes a small model
        # off the pattern (e.g. away from a second RESEARCHER), so JSON decodes without one first.
        penalties = [1.0, JSON_REDO_PENALTY] if request.json_schema is not None else [self.options.repeat_penalty]
        start = time.perf_counter()
        prompt_tokens = completion_tokens = cached_tokens = 0
        text, finish = "", None
        for penalty in penalties:
            text, finish, usage = await self._decode(server, chat, request, penalty, on_text)
            prompt_tokens += usage.get("prompt_tokens", 0)
            completion_tokens += usage.get("completion_tokens", 0)
            cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            if finish != "length":
                break
        elapsed_ms = (time.perf_counter() - start) * 1000
        return LLMResponse(
            text=text.strip(),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            llm_ms=elapsed_ms,
            cached_prompt_tokens=cached_tokens,
            finish_reason=finish,
        )

    async def _decode(
        self,
        server: ServerEndpoint,
        chat: bool,
        request: LLMRequest,
        repeat_penalty: float,
        on_text: Callable[[str], Awaitable[None] | None] | None,
    ) -> tuple[str, str | None, dict[str, Any]]:
        """One streamed decode (`chat`: the model's chat template renders the prompt): the text, why it
        stopped ("stop" or "length"), and the server's token usage."""
        path, body = request_body(request, self.options, chat, repeat_penalty)
        stream = AnswerStream()
        try:
            async with httpx.AsyncClient(base_url=server.address, timeout=request.timeout) as client:
                prefix = shared_prefix(request, chat) if server.prefix_cache is not None else None
                held = await hold_prefix(client, server.prefix_cache, server.prefix_key, prefix) if prefix is not None else None
                if held is not None:
                    body["id_slot"] = PREFIX_SLOT
                async with client.stream("POST", path, json=body) as response:
                    if response.status_code >= 400:
                        detail = (await response.aread()).decode(errors="replace")[:300]
                        raise LLMError(f"local backend: HTTP {response.status_code}: {detail}", transient=response.status_code >= 500)
                    async for line in response.aiter_lines():
                        if stream.feed(line) and on_text is not None and (pending := on_text(stream.text)) is not None:
                            await pending
        except httpx.TransportError as error:
            self._server = None  # the server may be gone: find (or start) it again on the next try
            raise LLMError(f"local backend: the model server at {server.address} did not answer: {error}", transient=True) from error
        except MalformedStream as error:
            raise LLMError(f"local backend: the model server at {server.address} sent a malformed stream: {error}") from None
        if not stream.done:
            raise LLMError(f"local backend: the model server at {server.address} closed the stream before the answer's end", transient=True)
        usage = stream.usage
        if held == "read":  # the server reused what the priming call read just now: nothing was saved this time
            usage = {**usage, "prompt_tokens_details": {"cached_tokens": 0}}
        return stream.text, stream.finish_reason, usage


def request_body(request: LLMRequest, options: LocalOptions, chat_template: bool, repeat_penalty: float) -> tuple[str, dict[str, Any]]:
    """The server's endpoint and the streamed request for `request`: chat for a model with a chat
    template, else the document it continues (llama_server.py), each within the request's budget and stops."""
    body: dict[str, Any] = {
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": request.max_tokens or options.max_tokens,
        "stop": list(request.stop),
        "temperature": options.temperature,
        "repeat_penalty": repeat_penalty,
        "seed": options.seed,
        "cache_prompt": True,
    }
    if request.json_schema is not None:
        body["json_schema"] = json_schema_field(request.json_schema)
    else:  # JSON repeats its keys by design
        body["dry_multiplier"] = options.dry_multiplier
        body["dry_sequence_breakers"] = DRY_SEQUENCE_BREAKERS
    if chat_template:
        return "/v1/chat/completions", {**body, "messages": chat_messages(request.messages)}
    prompt, stop = completion_prompt(request)
    return "/v1/completions", {**body, "prompt": prompt, "stop": [*request.stop, *stop]}


def _pieces(on_text: TextCallback) -> Callable[[str], None]:
    """The answer so far, handed on as the pieces it grew by (what `LLMRequest.on_text` takes)."""
    seen = 0

    def forward(text: str) -> None:
        nonlocal seen
        if len(text) < seen:  # a looping JSON answer is decoded again from its start
            seen = 0
        if len(text) > seen:
            on_text(text[seen:])
            seen = len(text)

    return forward


def chat_messages(messages: list[Message]) -> list[dict[str, str]]:
    """Chat-template messages with system prompts folded into the next user turn (Gemma has no system role)."""
    result: list[dict[str, str]] = []
    pending: list[str] = []
    for message in messages:
        if message.role == "system":
            pending.append(message.content)
        elif message.role == "user":
            result.append({"role": "user", "content": "\n\n".join([*pending, message.content])})
            pending = []
        else:
            result.append({"role": message.role, "content": message.content})
    if pending:
        result.append({"role": "user", "content": "\n\n".join(pending)})
    return result
