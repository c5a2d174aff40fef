"""A run as one OpenTelemetry trace, in the names of the GenAI semantic conventions, for tracing tools
(Phoenix, Langfuse, LangSmith) to show.

The driver makes the run's span (`invoke_workflow`) and, in its coordinator's thread, the `plan` span;
the hub makes one `invoke_agent` span per agent, since it alone sees an agent's whole life (its
inputs, every execution, its deadline, its sub-plan), linked to its dependencies' spans and, in a
sub-plan, the child of the delegating agent's span; the executor running the agent makes a `chat`
span per LLM call under it. Spans cross processes as a W3C traceparent inside the run's and the
agent's context (`TraceParent`), together with where spans go (`Exporting`): read once from the
driver's environment, because a Ray worker's (another node, a cluster started earlier) may lack it.

It is off unless `--otel` is given or the standard variables name an endpoint; then each process
sets up its exporter on first use, and flushes it when its part ends (an agent's call, the run), so
the spans that finished reach the collector however the run ends. Off, `opentelemetry` is never
imported. Message contents go on spans only with OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true;
options, keys and tokens never do.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import threading
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import ConfigError
from .llm import LLM, LLMConfig, LLMRequest, LLMResponse, Message
from .paths import ROOT, AgentPath
from .plan import AgentSpec, ExecutionPlan
from .record import AgentRecord, CoordinatorRecord, RunRecord

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
DEFAULT_ENDPOINT = "http://localhost:4318"  # OTLP/HTTP's own default
SERVICE_NAME = "metaagent-ray"
# How long one export may take, its retries included: a collector that is gone holds each agent's end,
# and the run's, no longer than this (an executor sends its spans before it returns the agent's result).
EXPORT_TIMEOUT_S = 3.0
INSTALL_HINT = "pip install 'metaagent-ray[otel]'"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exporting:
    """Where a run's spans go and what they may hold."""

    endpoint: str  # the OTLP/HTTP traces URL
    headers: tuple[tuple[str, str], ...] = ()  # OTEL_EXPORTER_OTLP_HEADERS: sent to the collector, never put on a span
    service_name: str = SERVICE_NAME
    capture_content: bool = False


@dataclass(frozen=True)
class TraceParent:
    """A span to continue in another process: its W3C traceparent, and where the spans go."""

    exporting: Exporting
    traceparent: str


def exporting(enabled: bool) -> Exporting | None:
    """The run's tracing, from `--otel` (`enabled`) and the standard variables; None when off.

    `--otel` without the extra is a ConfigError; the variables alone, without it, change nothing.
    """
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    traces, base = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip(), env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not (enabled or traces or base):
        return None
    if not _installed():
        if enabled:
            raise ConfigError(f"--otel needs OpenTelemetry's SDK and OTLP/HTTP exporter: {INSTALL_HINT}")
        return None
    from opentelemetry.util.re import parse_env_headers

    headers = env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS") or ""
    return Exporting(
        endpoint=traces or f"{(base or DEFAULT_ENDPOINT).rstrip('/')}/v1/traces",
        headers=tuple(sorted(parse_env_headers(headers, liberal=True).items())),
        service_name=env.get("OTEL_SERVICE_NAME", "").strip() or SERVICE_NAME,
        capture_content=env.get(CAPTURE_CONTENT_ENV, "").strip().lower() == "true",
    )


def _installed() -> bool:
    """Whether the otel extra is installed, found without importing it."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"))
    except ModuleNotFoundError:  # not even the `opentelemetry` package
        return False


_providers: dict[Exporting, TracerProvider | None] = {}  # this process's exporters, made on first use
_providers_lock = threading.Lock()


def _provider(exporting: Exporting) -> TracerProvider | None:
    """This process's tracer provider for `exporting`; None where OpenTelemetry is not installed (a node without the extra)."""
    with _providers_lock:
        if exporting not in _providers:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
                from opentelemetry.sdk.resources import Resource
                from opentelemetry.sdk.trace import TracerProvider
                from opentelemetry.sdk.trace.export import BatchSpanProcessor
            except ImportError:
                log.warning("this process cannot send the run's spans (%s)", INSTALL_HINT)
                _providers[exporting] = None
            else:
                # Our own provider, not the global one: an application's own tracing stays as it set it up.
                provider = TracerProvider(resource=Resource.create({"service.name": exporting.service_name, "process.pid": os.getpid()}))
                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=exporting.endpoint, headers=dict(exporting.headers), timeout=EXPORT_TIMEOUT_S)))
                _providers[exporting] = provider
        return _providers[exporting]


def _tracer(exporting: Exporting) -> Tracer | None:
    provider = _provider(exporting)
    return provider.get_tracer("metaagent_ray") if provider is not None else None


def flush(exporting: Exporting) -> None:
    """Send this process's finished spans now (bounded): its process may be killed with the run."""
    provider = _provider(exporting)
    if provider is not None:
        provider.force_flush(int(EXPORT_TIMEOUT_S * 1000))


def _traceparent(span: Span) -> str:
    from opentelemetry.trace import set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(span))
    return carrier["traceparent"]


def _context(parent: TraceParent) -> Any:
    """The OpenTelemetry context whose current span is `parent`'s."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": parent.traceparent})


def _failed(span: Span, error_type: str, description: str | None) -> None:
    from opentelemetry.trace import StatusCode

    span.set_attribute("error.type", error_type)
    span.set_status(StatusCode.ERROR, description)


class RunSpan:
    """The run's `invoke_workflow` span, in the driver; does nothing when the run is not traced."""

    def __init__(self, exporting: Exporting | None, llm: LLMConfig) -> None:
        tracer = _tracer(exporting) if exporting is not None else None
        self._span: Span | None = None
        self.parent: TraceParent | None = None  # what the coordinator's thread and the hub continue
        if exporting is not None and tracer is not None:
            attributes = {"gen_ai.operation.name": "invoke_workflow", "gen_ai.provider.name": llm.backend}
            if llm.model:
                attributes["gen_ai.request.model"] = llm.model
            self._span = tracer.start_span("invoke_workflow", attributes=attributes)
            self.parent = TraceParent(exporting, _traceparent(self._span))

    def finish(self, record: RunRecord) -> None:
        """The run's agents are done: its status; a failed one is an error."""
        if self._span is not None:
            self._span.set_attributes({"metaagent.run.status": record.status, "metaagent.run.agents": len(record.agents)})
            if record.status != "ok":
                _failed(self._span, "agents_failed", f"agents {record.failed_agents()} did not succeed")

    def end(self, error: type[BaseException] | None) -> None:
        """End the span (an error when the run ended by `error`: a stop signal, a lost Ray process) and send the driver's spans."""
        if self._span is None or self.parent is None:
            return
        if error is not None:
            _failed(self._span, error.__name__, None)
        self._span.end()
        flush(self.parent.exporting)


@dataclass(frozen=True)
class _Scope:
    """What this thread's LLM calls and plans become spans with."""

    tracer: Tracer
    llm: LLMConfig
    capture_content: bool


_scope: ContextVar[_Scope | None] = ContextVar("metaagent_ray_trace_scope", default=None)


@contextlib.contextmanager
def continued(parent: TraceParent | None, llm: LLMConfig) -> Iterator[None]:
    """Within it, this thread's plans and LLM calls (to `llm`) are spans under `parent`, a span of another process or
    thread; its spans are sent at the end. Without a parent nothing is traced."""
    tracer = _tracer(parent.exporting) if parent is not None else None
    if parent is None or tracer is None:
        yield
        return
    from opentelemetry import context

    token = context.attach(_context(parent))
    scope = _scope.set(_Scope(tracer, llm, parent.exporting.capture_content))
    try:
        yield
    finally:
        _scope.reset(scope)
        context.detach(token)
        flush(parent.exporting)


def _messages(messages: list[Message]) -> str:
    """Messages as the convention's `gen_ai.input.messages` JSON."""
    return json.dumps([{"role": message.role, "parts": [{"type": "text", "content": message.content}]} for message in messages])


def complete(llm: LLM, request: LLMRequest) -> LLMResponse:
    """`llm.complete(request)`, as a `chat` span with the GenAI attributes when this thread is in a trace."""
    scope = _scope.get()
    if scope is None:
        return llm.complete(request)
    from opentelemetry.trace import SpanKind

    model = scope.llm.model
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": scope.llm.backend,
        "metaagent.caller": request.caller,
        "metaagent.attempt": request.attempt,
    }
    if model:
        attributes["gen_ai.request.model"] = model
    if request.max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = request.max_tokens
    if scope.capture_content:
        attributes["gen_ai.input.messages"] = _messages(request.messages)
    name = f"chat {model}" if model else "chat"
    with scope.tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes, record_exception=False, set_status_on_exception=False) as span:
        try:
            response = llm.complete(request)
        except Exception as error:
            _failed(span, type(error).__qualname__, str(error))
            raise
        if response.prompt_tokens is not None:
            span.set_attribute("gen_ai.usage.input_tokens", response.prompt_tokens)
        if response.completion_tokens is not None:
            span.set_attribute("gen_ai.usage.output_tokens", response.completion_tokens)
        if response.cached_prompt_tokens is not None:
            span.set_attribute("gen_ai.usage.cache_read.input_tokens", response.cached_prompt_tokens)
        if response.finish_reason is not None:
            span.set_attribute("gen_ai.response.finish_reasons", [response.finish_reason])
        if scope.capture_content:
            span.set_attribute("gen_ai.output.messages", _messages([Message("assistant", response.text)]))
        return response


MakePlan = Callable[..., tuple[ExecutionPlan, CoordinatorRecord]]


def plan_span(make_plan: MakePlan) -> MakePlan:
    """Decorates the coordinator's `make_plan`: a `plan` span, holding its `chat` calls, when the thread is in a trace."""

    @functools.wraps(make_plan)
    def traced(*args: Any, **kwargs: Any) -> tuple[ExecutionPlan, CoordinatorRecord]:
        scope = _scope.get()
        if scope is None:
            return make_plan(*args, **kwargs)
        with scope.tracer.start_as_current_span("plan", attributes={"gen_ai.operation.name": "plan"}, record_exception=False, set_status_on_exception=False) as span:
            try:
                plan, record = make_plan(*args, **kwargs)
            except Exception as error:
                _failed(span, type(error).__qualname__, str(error))
                raise
            span.set_attributes(
                {
                    "metaagent.plan.agents": len(plan.agents),
                    "metaagent.plan.depth": plan.depth,
                    "metaagent.coordinator.attempts": record.attempts,
                    "metaagent.coordinator.fallback": record.fallback,
                }
            )
            return plan, record

    return traced


class AgentSpans:
    """The `invoke_agent` span of each agent of one run, made in the hub; does nothing when the run is not traced.

    A span starts when the hub starts supervising its agent (its inputs are there) and ends with its
    final result, its sub-plan included; it continues in the agent's executor through the
    traceparent that `start` returns for the agent's context.
    """

    def __init__(self, run: TraceParent | None) -> None:
        self._run = run
        self._tracer = _tracer(run.exporting) if run is not None else None
        self._spans: dict[AgentPath, Span] = {}  # every agent's, for its dependents' links and its sub-plan's parent
        self._open: dict[AgentPath, Span] = {}

    def start(self, path: AgentPath, spec: AgentSpec) -> TraceParent | None:
        """Start the agent's span; the traceparent its executor continues."""
        if self._tracer is None or self._run is None:
            return None
        from opentelemetry.trace import Link, set_span_in_context

        delegator = self._spans.get(path.parent) if path.parent != ROOT else None
        parent = set_span_in_context(delegator) if delegator is not None else _context(self._run)
        dependencies = [self._spans.get(path.parent.child(dependency)) for dependency in spec.depends_on]
        name = f"{spec.role.value.lower()} {path}"
        span = self._tracer.start_span(
            f"invoke_agent {name}",
            context=parent,
            links=[Link(span.get_span_context()) for span in dependencies if span is not None],
            attributes={
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": name,
                "gen_ai.agent.id": str(path),
                "metaagent.agent.role": spec.role.value,
                "metaagent.agent.depends_on": list(spec.depends_on),
            },
        )
        self._spans[path] = self._open[path] = span
        return TraceParent(self._run.exporting, _traceparent(span))

    def event(self, path: AgentPath, name: str, **attributes: str | int) -> None:
        """Something that happened to the agent (its executor was lost)."""
        span = self._open.get(path)
        if span is not None:
            span.add_event(name, attributes)

    def end(self, path: AgentPath, result: AgentRecord) -> None:
        """The agent's final result: its status, and its failure as the span's error."""
        span = self._open.pop(path, None)
        if span is None:
            return
        span.set_attributes({"metaagent.agent.status": result.status, "metaagent.agent.attempts": result.attempts})
        if result.failure is not None:
            _failed(span, result.failure.value, result.error)
        span.end()

    def close(self) -> None:
        """The run is over: an agent still open was cancelled with it."""
        for span in self._open.values():
            _failed(span, "cancelled", "the run ended before this agent did")
            span.end()
        self._open.clear()

    def flush(self) -> None:
        """Send the hub's spans (blocking: the hub calls it in a thread)."""
        if self._run is not None:
            flush(self._run.exporting)
