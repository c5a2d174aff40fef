"""An Ollama-compatible HTTP server for tests: real HTTP on 127.0.0.1, answers by content, faults on demand.

The Ollama backend is tested through the official `ollama` client against this server, never by
patching the client. It records every request, counts chat calls in flight (to show that calls
overlap, or that a cap holds), answers from the request's content rather than its arrival order,
and can misbehave per request the ways a real server does: HTTP 500, a dropped connection, a stall
past the client's timeout, a malformed body, a model that is not pulled. Like a real server it answers
within the request's `num_predict` (a token is a word here: done_reason "length" when it cut the
answer); it applies no stop sequences, so that what a backend does with an answer past them shows.

    with OllamaServer() as server:
        llm = create_llm(LLMConfig(backend="ollama", options={"host": server.url}))
        ...
        assert all(body["model"] == "llama3.2:1b" for body in server.chat_bodies())
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Literal, Mapping

from typing_extensions import Self

from metaagent_ray.llm.base import MODEL_REQUESTS_ENV

Fault = Literal["http_500", "drop", "stall", "malformed", "not_found"]
Responder = Callable[[dict[str, Any]], str]  # a chat request body -> the answer's text
DelayFn = Callable[[dict[str, Any]], float]  # a chat request body -> seconds to wait before answering
FaultFn = Callable[[dict[str, Any]], "Fault | None"]  # a chat request body -> the fault to answer with

DEFAULT_MODELS: dict[str, int] = {"llama3.2:1b": 1_321_098_329}  # name -> size in bytes, as `ollama list`

DEFAULT_PLAN: dict[str, Any] = {
    "description": "Two parallel researchers, then analysis and synthesis",
    "agents": [
        {"role": "RESEARCHER", "task": "Research the first aspect", "depends_on": []},
        {"role": "RESEARCHER", "task": "Research the second aspect", "depends_on": []},
        {"role": "ANALYZER", "task": "Compare the findings", "depends_on": [0, 1]},
        {"role": "SYNTHESIZER", "task": "Write the final answer", "depends_on": [2]},
    ],
}


@dataclass(frozen=True)
class RecordedRequest:
    """One request as it arrived: `body` is the parsed JSON, None when there was none."""

    method: str
    path: str
    body: dict[str, Any] | None
    arrived: float  # time.monotonic()


def last_user_message(body: dict[str, Any]) -> str:
    """The content of the request's last user message ("" when there is none)."""
    users = [message.get("content", "") for message in body.get("messages", []) if message.get("role") == "user"]
    return users[-1] if users else ""


def default_responder(body: dict[str, Any]) -> str:
    """A valid plan when the request asks for JSON (`format`), else an answer naming the request."""
    if body.get("format") is not None:
        return json.dumps(DEFAULT_PLAN)
    first_line = (last_user_message(body).strip().splitlines() or [""])[0]
    return f"Answer to: {first_line[:120]}"


def first_calls(count: int, fault: Fault) -> FaultFn:
    """A fault for the first `count` chat calls, then normal answers: for retry tests."""
    lock = threading.Lock()
    seen = 0

    def choose(body: dict[str, Any]) -> Fault | None:
        nonlocal seen
        with lock:
            seen += 1
            return fault if seen <= count else None

    return choose


def _full_name(model: str) -> str:
    """As Ollama does: a model named without a tag is `name:latest`."""
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


def allow_model_requests_to(url: str, allowed: bool = True) -> None:
    """Add `url` to (or take it off) the servers backends may call while real models are off in tests
    ($METAAGENT_ALLOW_MODEL_REQUESTS, tests/conftest.py): a stand-in is no model."""
    current = os.environ.get(MODEL_REQUESTS_ENV, "1")
    if current == "1":
        return
    others = [item for item in current.split(",") if item != url]
    os.environ[MODEL_REQUESTS_ENV] = ",".join([*others, url] if allowed else others)


class BackgroundServer:
    """An HTTP server on its own thread; each request goes to the subclass's `_handle(handler, method)`.

    While it runs, backends may call it although real models are off in tests (`allow_model_requests_to`).
    """

    def _listen(self, host: str, port: int) -> None:
        self._closing = threading.Event()  # wakes stalled and delayed handlers at shutdown
        self._httpd = OwnedHTTPServer((host, port), OwnedHandler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Self:
        self._thread.start()
        allow_model_requests_to(self.url)
        return self

    def stop(self) -> None:
        allow_model_requests_to(self.url, allowed=False)
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class OllamaServer(BackgroundServer):
    """The server: start with `with OllamaServer(...) as server` (or start()/stop()); it listens at `url`.

    `responder`, `delay`, `fault`, `hold` and `duration_ns` may be changed between calls; `reset()`
    restores them and clears the records. `hold=N` makes each chat call wait until N have been in flight
    at once (at most `hold_timeout` s), so overlap is shown by the count, not by timing. `duration_ns`
    is the `total_duration` an answer reports (default: the time the server took), as a model's would.
    """

    def __init__(
        self,
        *,
        models: Mapping[str, int] | None = None,
        responder: Responder = default_responder,
        delay: float | DelayFn = 0.0,
        fault: FaultFn | None = None,
        hold: int | None = None,
        hold_timeout: float = 5.0,
        stall_seconds: float = 30.0,
        duration_ns: int | None = None,
    ) -> None:
        self.models = dict(DEFAULT_MODELS if models is None else models)
        self.responder = responder
        self.delay = delay
        self.fault = fault
        self.hold = hold
        self.duration_ns = duration_ns
        self.hold_timeout = hold_timeout
        self.stall_seconds = stall_seconds
        self._initial = (responder, delay, fault, hold, duration_ns)
        self._lock = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._listen("127.0.0.1", 0)

    def stop(self) -> None:
        """Stop serving; stalled, delayed or held handlers are woken so that none outlives the server."""
        self._closing.set()
        with self._lock:
            self._lock.notify_all()
        super().stop()

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    def chat_bodies(self) -> list[dict[str, Any]]:
        """The JSON bodies of the /api/chat requests so far."""
        return [request.body or {} for request in self.requests if request.path == "/api/chat"]

    def wait_until_idle(self, timeout: float = 5.0) -> bool:
        """Whether every chat call is over within `timeout` s: a client has its answer a moment before
        the handler that sent it counts itself out, and a stalled call counts until `stall_seconds`
        pass or the server stops, even after its client gave up."""
        with self._lock:
            return self._lock.wait_for(lambda: self._in_flight == 0, timeout)

    @property
    def max_in_flight(self) -> int:
        """The most chat calls ever handled at once (since the last reset)."""
        with self._lock:
            return self._max_in_flight

    def _wait_for_peak(self, count: int, timeout: float) -> None:
        """Wait until `count` calls have been in flight at once: the peak, unlike the live count,
        stays reached when the first released call finishes before the others wake."""
        with self._lock:
            self._lock.wait_for(lambda: self._max_in_flight >= count or self._closing.is_set(), timeout)

    def reset(self) -> None:
        """Forget the requests seen and the in-flight maximum; restore the behaviour given at start."""
        self.responder, self.delay, self.fault, self.hold, self.duration_ns = self._initial
        with self._lock:
            self._requests.clear()
            self._max_in_flight = 0

    # --- request handling (called on the server's handler threads) ---

    def _record(self, method: str, path: str, body: dict[str, Any] | None) -> None:
        with self._lock:
            self._requests.append(RecordedRequest(method, path, body, time.monotonic()))

    def _has_model(self, name: str) -> bool:
        return any(_full_name(model) == _full_name(name) for model in self.models)

    def _handle(self, handler: OwnedHandler, method: str) -> None:
        path = handler.path.split("?", 1)[0]
        body: dict[str, Any] | None = None
        length = int(handler.headers.get("Content-Length") or 0)
        if length:
            try:
                body = json.loads(handler.rfile.read(length))
            except json.JSONDecodeError:
                self._record(method, path, None)
                handler.send_json(400, {"error": "invalid JSON body"})
                return
        self._record(method, path, body)
        if method in ("GET", "HEAD") and path == "/":
            handler.send_text(200, "Ollama is running")
        elif method == "GET" and path == "/api/version":
            handler.send_json(200, {"version": "0.0.0-test"})
        elif method == "GET" and path == "/api/tags":
            handler.send_json(200, {"models": [_tag(name, size) for name, size in self.models.items()]})
        elif method == "POST" and path == "/api/show":
            self._show(handler, body or {})
        elif method == "POST" and path == "/api/chat":
            self._chat(handler, body or {})
        else:
            handler.send_text(404, "404 page not found")

    def _show(self, handler: OwnedHandler, body: dict[str, Any]) -> None:
        name = str(body.get("model", ""))
        if not self._has_model(name):
            handler.send_json(404, {"error": f"model '{name}' not found"})
            return
        handler.send_json(200, {
            "modelfile": "",
            "parameters": "",
            "template": "{{ .Prompt }}",
            "details": _tag(name, 0)["details"],
            "model_info": {"general.architecture": "llama"},
            "capabilities": ["completion"],
            "modified_at": "2025-01-01T00:00:00Z",
        })

    def _chat(self, handler: OwnedHandler, body: dict[str, Any]) -> None:
        started = time.monotonic()
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            self._lock.notify_all()
        try:
            self._chat_in_flight(handler, body, started)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._lock.notify_all()

    def _chat_in_flight(self, handler: OwnedHandler, body: dict[str, Any], started: float) -> None:
        fault = self.fault(body) if self.fault is not None else None
        if fault is None and not self._has_model(str(body.get("model", ""))):
            fault = "not_found"
        if self.hold is not None:
            self._wait_for_peak(self.hold, self.hold_timeout)
        seconds = self.delay(body) if callable(self.delay) else self.delay
        if seconds:
            self._closing.wait(seconds)
        if fault == "stall":
            self._closing.wait(self.stall_seconds)
            handler.drop()
        elif fault == "drop":
            handler.drop()
        elif fault == "http_500":
            handler.send_json(500, {"error": "llama runner process has terminated: exit status 2 (test fault)"})
        elif fault == "not_found":
            handler.send_json(404, {"error": f"model \"{body.get('model', '')}\" not found, try pulling it first"})
        elif fault == "malformed":
            handler.send_raw(200, "application/json", b'{"model": "x", "message": {"role": "assistant", "content": "unterm')
        else:
            self._answer(handler, body, started)

    def _answer(self, handler: OwnedHandler, body: dict[str, Any], started: float) -> None:
        try:
            text, finish = within_budget(self.responder(body), (body.get("options") or {}).get("num_predict"))
        except Exception as error:  # a test's responder failed: say so over HTTP rather than hang
            handler.send_json(500, {"error": f"test responder failed: {error!r}"})
            return
        prompt_tokens = sum(len(str(message.get("content", "")).split()) for message in body.get("messages", []))
        total_ns = self.duration_ns or max(1, int((time.monotonic() - started) * 1e9))
        base = {"model": body.get("model", ""), "created_at": "2025-01-01T00:00:00Z"}
        last = {
            **base,
            "message": {"role": "assistant", "content": "" if body.get("stream") else text},
            "done": True,
            "done_reason": finish,
            "total_duration": total_ns,
            "load_duration": 0,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": total_ns // 2,
            "eval_count": len(text.split()),
            "eval_duration": total_ns // 2,
        }
        if body.get("stream"):  # one JSON line per token (a word here), then the line with the counts
            tokens = [{**base, "message": {"role": "assistant", "content": piece}, "done": False} for piece in words_of(text)]
            handler.send_stream("application/x-ndjson", [json.dumps(line).encode() + b"\n" for line in [*tokens, last]])
        else:
            handler.send_json(200, last)


def words_of(text: str) -> list[str]:
    """A streamed answer's pieces: each word with the space before it."""
    return re.findall(r"\s*\S+", text)


def within_budget(text: str, max_tokens: int | None) -> tuple[str, str]:
    """The answer cut to `max_tokens` words, as a server cuts it to its budget, and why it ended."""
    pieces = words_of(text)
    if max_tokens is None or len(pieces) <= max_tokens:
        return text, "stop"
    return "".join(pieces[:max_tokens]), "length"


def _tag(name: str, size: int) -> dict[str, Any]:
    """One entry of /api/tags, shaped like a real server's."""
    return {
        "name": name,
        "model": name,
        "modified_at": "2025-01-01T00:00:00Z",
        "size": size,
        "digest": "0" * 64,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "1.2B",
            "quantization_level": "Q8_0",
        },
    }


class OwnedHTTPServer(ThreadingHTTPServer):
    """One thread per request, a deep accept queue for bursts of concurrent calls."""

    daemon_threads = True
    request_queue_size = 128
    owner: Any  # an object with _handle(handler, method): OllamaServer, or the stand-in server


class OwnedHandler(BaseHTTPRequestHandler):
    """Hands each request to its server's `owner._handle(handler, method)`; one request per connection (HTTP/1.0)."""

    server: OwnedHTTPServer
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        self.server.owner._handle(self, "GET")

    def do_HEAD(self) -> None:
        self.server.owner._handle(self, "HEAD")

    def do_POST(self) -> None:
        self.server.owner._handle(self, "POST")

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: pytest shows failures, not access logs."""

    def send_raw(self, status: int, content_type: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def send_stream(self, content_type: str, pieces: list[bytes]) -> None:
        """A 200 whose body is written and flushed piece by piece; closing the connection ends it (HTTP/1.0)."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.end_headers()
        for piece in pieces:
            self.wfile.write(piece)
            self.wfile.flush()

    def send_json(self, status: int, data: dict[str, Any]) -> None:
        self.send_raw(status, "application/json; charset=utf-8", json.dumps(data).encode())

    def send_text(self, status: int, text: str) -> None:
        self.send_raw(status, "text/plain; charset=utf-8", text.encode())

    def drop(self) -> None:
        """Close the connection without a word: the client sees the server disconnect."""
        self.close_connection = True
