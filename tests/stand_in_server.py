"""A stand-in LLM server: real HTTP on 127.0.0.1, speaking the Ollama API or the OpenAI API (chat and completions).

It is the OpenAI-compatible server the `openai` backend is tested against
(faults on demand, like tests/ollama_server.py). Like a real server it answers within the request's
`max_tokens` (a token is a word here: "length" when it cut the answer), but it applies no stop
sequences, so that what a backend does with an answer that ran past them shows; given `props`, it
answers llama-server's `GET /props` with them (else 404, as vLLM does). `stats()` gives its chat
calls so far and the most it ever had in flight at once.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Literal, Sequence

from tests.ollama_server import DEFAULT_PLAN, BackgroundServer, OwnedHandler, default_responder, within_budget, words_of

Api = Literal["ollama", "openai"]
# drip: a 200 whose body comes a byte at a time, never ending while the server runs (no read timeout fires);
# cut: a 200 whose body stops halfway and the connection closes (a JSON body's Content-Length is not met,
# a stream never sends its [DONE])
Fault = Literal["http_500", "http_429", "http_400", "drop", "stall", "malformed", "drip", "cut"]
Responder = Callable[[dict[str, Any]], str]  # a chat request body -> the answer's text
FaultFn = Callable[[dict[str, Any]], "Fault | None"]  # a chat request body -> the fault to answer with


def answer(body: dict[str, Any]) -> str:
    """A valid plan when the request asks for JSON (either API's way), else an answer naming the request
    (a completion's: its document's last task)."""
    if body.get("response_format") is not None or body.get("format") is not None:
        return json.dumps(DEFAULT_PLAN)
    if "prompt" in body:
        tasks = [line.removeprefix("Task:").strip() for line in str(body["prompt"]).splitlines() if line.startswith("Task:")]
        return f"Answer to: {tasks[-1] if tasks else str(body['prompt']).splitlines()[0]}"
    return default_responder(body)


class StandInServer(BackgroundServer):
    """Start with `with StandInServer(api=...) as server` (or start()/stop()); it listens at `url`.

    `delay`, `responder` and `fault` may be changed between calls. Chat calls to a model not in
    `models` get the API's "model not found" answer (HTTP 404).
    """

    def __init__(
        self,
        *,
        api: Api = "openai",
        host: str = "127.0.0.1",
        port: int = 0,
        models: Sequence[str] = ("test-model",),
        delay: float = 0.0,
        responder: Responder = answer,
        fault: FaultFn | None = None,
        stall_seconds: float = 30.0,
        props: dict[str, Any] | None = None,
    ) -> None:
        self.api = api
        self.props = props
        self.models = list(models)
        self.delay = delay
        self.responder = responder
        self.fault = fault
        self.stall_seconds = stall_seconds
        self._lock = threading.Lock()
        self._bodies: list[dict[str, Any]] = []
        self._headers: list[dict[str, str]] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._listen(host, port)

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as its base URL."""
        return f"{self.url}/v1"

    def chat_bodies(self) -> list[dict[str, Any]]:
        """The JSON bodies of the chat (and completion) calls so far, in arrival order."""
        with self._lock:
            return list(self._bodies)

    def chat_headers(self) -> list[dict[str, str]]:
        """The headers of the chat calls so far (names in lower case)."""
        with self._lock:
            return list(self._headers)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"chats": len(self._bodies), "in_flight": self._in_flight, "max_in_flight": self._max_in_flight}

    # --- request handling (on the server's handler threads) ---

    def _handle(self, handler: OwnedHandler, method: str) -> None:
        path = handler.path.split("?", 1)[0]
        if self.api == "ollama" and method == "GET" and path == "/":
            handler.send_text(200, "Ollama is running")
        elif self.api == "ollama" and method == "GET" and path == "/api/tags":
            handler.send_json(200, {"models": [{"name": name, "model": name, "size": 1} for name in self.models]})
        elif self.api == "openai" and method == "GET" and path == "/v1/models":
            data = [{"id": name, "object": "model", "created": 0, "owned_by": "stand-in"} for name in self.models]
            handler.send_json(200, {"object": "list", "data": data})
        elif self.api == "openai" and method == "GET" and path == "/props" and self.props is not None:
            handler.send_json(200, self.props)
        elif method == "POST" and path in ("/api/chat", "/v1/chat/completions", "/v1/completions"):
            self._chat(handler, path)
        else:
            handler.send_text(404, "404 page not found")

    def _chat(self, handler: OwnedHandler, path: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        try:
            body = json.loads(handler.rfile.read(length)) if length else {}
        except json.JSONDecodeError:
            handler.send_json(400, {"error": "invalid JSON body"})
            return
        with self._lock:
            self._bodies.append(body)
            self._headers.append({name.lower(): value for name, value in handler.headers.items()})
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            if self.delay:
                self._closing.wait(self.delay)
            if path == "/api/chat":
                self._ollama_chat(handler, body)
            else:
                self._openai_chat(handler, body, chat=path == "/v1/chat/completions")
        finally:
            with self._lock:
                self._in_flight -= 1

    def _ollama_chat(self, handler: OwnedHandler, body: dict[str, Any]) -> None:
        if body.get("model") not in self.models:
            handler.send_json(404, {"error": f"model \"{body.get('model', '')}\" not found, try pulling it first"})
            return
        text, finish = within_budget(self.responder(body), (body.get("options") or {}).get("num_predict"))
        handler.send_json(200, {
            "model": body["model"],
            "created_at": "2025-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": text},
            "done": True,
            "done_reason": finish,
            "prompt_eval_count": _words(body),
            "eval_count": len(text.split()),
        })

    def _openai_chat(self, handler: OwnedHandler, body: dict[str, Any], chat: bool) -> None:
        fault = self.fault(body) if self.fault is not None else None
        if fault == "stall":
            self._closing.wait(self.stall_seconds)
            handler.drop()
        elif fault == "drop":
            handler.drop()
        elif fault in ("http_500", "http_429", "http_400"):
            status = int(fault.removeprefix("http_"))
            handler.send_json(status, {"error": {"message": f"test fault {status}", "type": "test_fault", "code": status}})
        elif fault == "malformed":
            handler.send_raw(200, "application/json", b'{"id": "x", "choices": [{"message": {"content": "unterm')
        elif fault == "drip":
            handler.send_stream("text/event-stream" if body.get("stream") else "application/json", [])
            while not self._closing.wait(DRIP_INTERVAL_S):
                handler.wfile.write(b" ")
                handler.wfile.flush()
        elif fault == "cut":
            self._cut(handler, body)
        elif body.get("model") not in self.models:
            # vLLM's shape for an unknown model: the error's fields at the top level
            message = f"The model `{body.get('model', '')}` does not exist."
            handler.send_json(404, {"object": "error", "message": message, "type": "NotFoundError", "code": 404})
        else:
            text, finish = within_budget(self.responder(body), body.get("max_tokens"))
            prompt, completion = _words(body), len(text.split())
            usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
            if body.get("stream"):  # server-sent events: one per token (a word here), the last with the finish reason, the usage, [DONE]
                pieces = words_of(text)
                events = [
                    {"choices": [{"index": 0, **_content(piece, chat), "finish_reason": finish if number == len(pieces) else None}]}
                    for number, piece in enumerate(pieces, 1)
                ]
                events.append({"choices": [], "usage": usage})
                handler.send_stream("text/event-stream", [f"data: {json.dumps(event)}\n\n".encode() for event in events] + [b"data: [DONE]\n\n"])
                return
            choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
            handler.send_json(200, {
                "id": "chatcmpl-stand-in" if chat else "cmpl-stand-in",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{**choice, "finish_reason": finish}],
                "usage": usage,
            })

    def _cut(self, handler: OwnedHandler, body: dict[str, Any]) -> None:
        """Half of the answer, then the connection closes."""
        text = self.responder(body)
        if body.get("stream"):
            pieces = words_of(text)
            events = [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in pieces[: len(pieces) // 2]]
            handler.send_stream("text/event-stream", [f"data: {json.dumps(event)}\n\n".encode() for event in events])
            return
        payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload[: len(payload) // 2])
        handler.close_connection = True


DRIP_INTERVAL_S = 0.1


def _content(piece: str, chat: bool) -> dict[str, Any]:
    """A streamed piece as chat (a delta) or a completion (text) carries it."""
    return {"delta": {"content": piece}} if chat else {"text": piece}


def _words(body: dict[str, Any]) -> int:
    """A stand-in token count: the words of every message, or of the prompt."""
    return len(str(body.get("prompt", "")).split()) + sum(len(str(message.get("content", "")).split()) for message in body.get("messages", []))

