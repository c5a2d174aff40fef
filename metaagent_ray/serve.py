"""`metaagent serve`: many runs on one cluster over HTTP, sharing its LLM slots in one queue.

A Ray Serve application with a FastAPI ingress. Its one replica is the driver of every run it
takes: each run is a `MetaAgent` run in a thread of the replica, so all of them open in the same
run hub, whose one `SlotPool` (`share_slots`) orders their ready agents across runs by a policy
(docs/serve.md). Runs are kept in run directories under `runs_dir` as any CLI run is, so
`metaagent resume` and `metaagent report` work on them, and a restarted service lists them again.
A run is cancelled the way Ctrl-C ends a CLI run (`RunStop`): status interrupted, resumable.

Annotations are evaluated here (no `from __future__ import annotations`): FastAPI reads the
endpoints' types through Serve's class-based ingress, where names in strings would not resolve.
"""

import asyncio
import html
import json
import re
import shlex
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import ConfigDict, model_validator
from pydantic_core import to_jsonable_python
from ray import serve

from .api import (
    POLICIES,
    MetaAgent,
    MetaAgentError,
    PlanError,
    Policy,
    RunSettings,
    RunStop,
    RunStopped,
    load_record,
    parse_plan,
    share_slots,
)
from .events import Event, Notice, PlanReady
from .report import report_html
from .run_directory import RunDirectory, run_dir_name

APP_NAME = "metaagent"
SERVICE_OWNED = ("slots", "address", "serve_llm")  # the service's, not a run's: its runs share its slots on its cluster
LEFT_UNFINISHED = "the process that ran it stopped before the run ended; continue it with: metaagent resume {path}"
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a run directory's name under runs_dir, never a path


class RunRequest(RunSettings):
    """POST /v1/runs: a query for the coordinator or a whole plan, with a CLI run's options (every `RunSettings`
    field but the service's own); a bad field is a 422 that names it."""

    model_config = ConfigDict(extra="forbid")

    query: str | None = None
    plan: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_task(self) -> "RunRequest":
        if (self.query is None) == (self.plan is None):
            raise ValueError("give exactly one of `query` or `plan`")
        owned = [name for name in SERVICE_OWNED if name in self.model_fields_set]
        if owned:
            raise ValueError(f"{', '.join(owned)}: set by the service for all its runs, not per run")
        if self.plan is not None:
            try:
                parse_plan(self.plan, max_agents=self.max_agents)
            except PlanError as error:
                raise ValueError(str(error)) from None
        return self

    def settings(self) -> dict[str, Any]:
        """The run's settings, as `MetaAgent` takes them."""
        return self.model_dump(exclude={"query", "plan", *SERVICE_OWNED}, exclude_unset=True)


@dataclass
class ServedRun:
    """One run the service took: its thread, its stop, and its events so far (for every follower, from the start)."""

    id: str
    directory: Path
    stop: RunStop = field(default_factory=RunStop)
    status: str = "planning"  # then "running", then the record's own end: ok, failed, interrupted
    error: str | None = None
    events: list[str] = field(default_factory=list)  # server-sent events, each whole
    ended: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def said(self, text: str, loop: asyncio.AbstractEventLoop, *, last: bool = False) -> None:
        """From the run's thread: one more event (the `last`); followers waiting on the service's loop wake."""
        loop.call_soon_threadsafe(self._append, text, last)

    def _append(self, text: str, last: bool) -> None:
        self.events.append(text)
        self.ended = last
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self) -> AsyncIterator[str]:
        """Every event from the first, then each as it comes, until the run ends."""
        sent = 0
        while True:
            changed = self._changed
            while sent < len(self.events):
                sent += 1
                yield self.events[sent - 1]
            if self.ended:
                return
            await changed.wait()


def sse(name: str, data: Any) -> str:
    """One server-sent event."""
    return f"event: {name}\ndata: {json.dumps(to_jsonable_python(data, fallback=str))}\n\n"


class RunService:
    """The service's state: the runs it took and those earlier ones its runs directory holds."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = runs_dir
        self.runs: dict[str, ServedRun] = {}
        runs_dir.mkdir(parents=True, exist_ok=True)

    def start(self, request: RunRequest, loop: asyncio.AbstractEventLoop) -> ServedRun:
        run_id = f"{run_dir_name(request.query or 'plan')}-{uuid.uuid4().hex[:6]}"
        run = ServedRun(run_id, self.runs_dir / run_id)
        self.runs[run.id] = run
        threading.Thread(target=self._run, args=(run, request, loop), name=f"metaagent-run-{run.id}", daemon=True).start()
        return run

    def _run(self, run: ServedRun, request: RunRequest, loop: asyncio.AbstractEventLoop) -> None:
        """The run, start to end, in its own thread: its events become server-sent ones."""

        def on_event(event: Event) -> None:
            if isinstance(event, PlanReady):
                run.status = "running"
            run.said(sse(type(event).__name__, event), loop)

        try:
            agent = MetaAgent(on_event=on_event, stop=run.stop, **request.settings())
            if request.query is not None:
                record = agent.run(request.query, run_dir=run.directory)
            else:
                record = agent.execute(request.plan or {}, run_dir=run.directory)
            run.status = record.status
        except RunStopped as stopped:
            run.status, run.error = stopped.record.status, str(stopped)
        except (MetaAgentError, ValueError) as error:
            run.status, run.error = ("interrupted" if run.stop.requested else "failed"), str(error)
        except Exception as error:  # noqa: BLE001 - the service outlives any one run
            run.status, run.error = "failed", f"{type(error).__name__}: {error}"
        run.said(sse("end", {"status": run.status, "error": run.error}), loop, last=True)

    def find(self, run_id: str) -> ServedRun | None:
        """A run this service took, or an earlier one in its runs directory: ended, still running in another
        process, or left unfinished by a process that stopped (then `interrupted`, to resume)."""
        if run_id in self.runs:
            return self.runs[run_id]
        if not RUN_ID.match(run_id) or not RunDirectory(self.runs_dir / run_id).record_file.is_file():
            return None
        directory = RunDirectory(self.runs_dir / run_id)
        try:
            record = load_record(directory.path)
        except MetaAgentError:
            return None
        if record.status == "running" and not directory.in_use():  # the process that ran it ended before the run did
            error = LEFT_UNFINISHED.format(path=shlex.quote(str(directory.path)))
            return ServedRun(run_id, directory.path, status="interrupted", error=error, ended=True)
        return ServedRun(run_id, directory.path, status=record.status, ended=True)  # this service has no events of it

    def all(self) -> list[ServedRun]:
        """Every run, newest first: those taken now and the earlier ones on disk."""
        earlier = [path.name for path in self.runs_dir.iterdir() if path.name not in self.runs]
        found = [self.find(name) for name in earlier]
        return sorted([*self.runs.values(), *(run for run in found if run is not None)], key=lambda run: run.id, reverse=True)

    @staticmethod
    def summary(run: ServedRun) -> dict[str, Any]:
        return {"id": run.id, "status": run.status, "error": run.error, "run_dir": str(run.directory)}

    @staticmethod
    def record(run: ServedRun) -> Any:
        """record.json as written now (a checkpoint while the run goes on), or None before the plan is complete."""
        path = RunDirectory(run.directory).record_file
        return json.loads(path.read_text()) if path.is_file() else None

    @staticmethod
    def report(run: ServedRun) -> str | None:
        """report.html once the run ended; while it runs, the same page drawn from its latest checkpoint, reloading itself."""
        directory = RunDirectory(run.directory)
        if run.ended and directory.report_file.is_file():
            return directory.report_file.read_text()
        if not directory.record_file.is_file():
            return None
        return report_html(load_record(run.directory), reload_s=2)


def index_page(runs: list[ServedRun]) -> str:
    """GET /: every run with its status, each linking to its report."""
    rows = "\n".join(
        f'<tr><td><a href="/v1/runs/{html.escape(run.id)}/report">{html.escape(run.id)}</a></td>'
        f'<td class="status">{html.escape(run.status)}</td></tr>'
        for run in runs
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>metaagent serve</title>'
        '<meta http-equiv="refresh" content="5"></head><body><h1>metaagent serve</h1>'
        f'<table id="runs"><tr><th>run</th><th>status</th></tr>\n{rows}\n</table></body></html>\n'
    )


app = FastAPI(title="metaagent serve")


@serve.deployment(max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class ServiceDeployment:
    """The one replica: the driver of every run; shares the cluster's slots among them (`share_slots`)."""

    def __init__(self, runs_dir: str, slots: int | None, policy: Policy) -> None:
        self.slots = share_slots(slots, policy)
        self.service = RunService(Path(runs_dir))

    def _found(self, run_id: str) -> ServedRun:
        run = self.service.find(run_id)
        if run is None:
            raise HTTPException(status_code=404, detail=f"no run {run_id!r}")
        return run

    @app.post("/v1/runs")
    async def create(self, request: RunRequest) -> dict[str, str]:
        return {"id": self.service.start(request, asyncio.get_running_loop()).id}

    @app.get("/v1/runs")
    async def list_runs(self) -> list[dict[str, Any]]:
        return [self.service.summary(run) for run in self.service.all()]

    @app.get("/v1/runs/{run_id}")
    async def get_run(self, run_id: str) -> dict[str, Any]:
        run = self._found(run_id)
        return {**self.service.summary(run), "record": self.service.record(run)}

    @app.get("/v1/runs/{run_id}/events")
    async def events(self, run_id: str) -> StreamingResponse:
        run = self._found(run_id)
        if run_id not in self.service.runs:  # an earlier run: its story is its record
            lines = [sse("end", {"status": run.status, "error": run.error})]
            return StreamingResponse(iter(lines), media_type="text/event-stream")
        return StreamingResponse(run.follow(), media_type="text/event-stream")

    @app.get("/v1/runs/{run_id}/report", response_class=HTMLResponse)
    async def report(self, run_id: str) -> HTMLResponse:
        page = self.service.report(self._found(run_id))
        if page is None:
            raise HTTPException(status_code=404, detail=f"run {run_id!r} has no report yet: its plan is not complete")
        return HTMLResponse(page)

    @app.delete("/v1/runs/{run_id}")
    async def cancel(self, run_id: str) -> dict[str, Any]:
        run = self._found(run_id)
        if not run.ended:
            run.stop()
        return self.service.summary(run)

    @app.get("/", response_class=HTMLResponse)
    async def index(self) -> HTMLResponse:
        return HTMLResponse(index_page(self.service.all()))


@dataclass(frozen=True)
class ServiceOptions:
    """How `metaagent serve` runs: where it listens, its slots and their order, where runs are kept."""

    host: str = "127.0.0.1"
    port: int = 8000
    slots: int | None = None
    policy: Policy = "short"
    runs_dir: Path = Path("runs")
    llm: str = "auto"  # whose footprint sizes embedded Ray's slots
    address: str | None = None


@dataclass(frozen=True)
class Service:
    """A started service: where it listens, and how to stop it."""

    url: str
    connection: MetaAgent  # its connection to Ray: closing it stops a Ray this process started

    def stop(self) -> None:
        """Shut Serve down on the cluster (the replica, and with it the executors and runs it drove), then Ray if it is ours."""
        serve.shutdown()
        self.connection.close()


def start_service(options: ServiceOptions, on_notice: Callable[[str], None] = print) -> Service:
    """Connect to Ray (embedded or `address`), start Serve on `host:port` and the service on it.

    Serve's proxy runs on the head node only: one address, as the CLI says.
    """
    if options.policy not in POLICIES:
        raise MetaAgentError(f"--policy {options.policy}: choose one of {', '.join(POLICIES)}")
    def notice(event: Event) -> None:
        if isinstance(event, Notice):
            on_notice(event.text)

    connection = MetaAgent(llm=options.llm, address=options.address, slots=options.slots, on_event=notice)
    connection.connect()
    serve.start(proxy_location="HeadOnly", http_options={"host": options.host, "port": options.port})
    serve.run(
        ServiceDeployment.bind(str(options.runs_dir.resolve()), options.slots, options.policy),
        name=APP_NAME,
        route_prefix="/",
    )
    return Service(f"http://{options.host}:{options.port}", connection)
