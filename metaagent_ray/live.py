"""The live terminal view of a run: the seed's lines scroll above a live area that shows where the run is.

While the coordinator plans: a spinner with the elapsed time and the tokens streamed so far. While
agents run: one row per agent (sub-plan agents under their parent) with its state, time, tokens and
tokens/s (and its round, when the joiner replanned), a bar of agents done and the slots in use, and
the final agent's answer as it streams.
Only for terminals: pipes and CI get `ConsoleView`'s plain lines, unchanged.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from .console import ConsoleView
from .events import (
    COORDINATOR,
    AgentFinished,
    AgentStarted,
    Event,
    PlanningStarted,
    PlanReady,
    RayStarting,
    RoundStarted,
    RunFinished,
    SubPlanReady,
    TokensArrived,
)
from .paths import ROOT, AgentPath
from .plan import ExecutionPlan
from .viz import colour

DONE = ("ok", "failed", "skipped", "reused")
STATE_STYLE = {
    "waiting": "dim",
    "queued": "yellow",
    "running": "bold cyan",
    "delegated": "magenta",
    "ok": "green",
    "failed": "bold red",
    "skipped": "red",
    "reused": "blue",
}
STREAM_LINES = 8  # how much of the final answer the live area shows while it streams
REFRESH_PER_SECOND = 8


@dataclass
class _Row:
    """One agent as the live area shows it."""

    path: AgentPath
    role: str
    layer: int
    depends_on: list[AgentPath]
    state: str = "waiting"
    started: float | None = None  # time.monotonic() when its start was reported
    seconds: float | None = None  # its LLM call's length, once finished
    tokens: int = 0
    node: str = ""
    round: int = 1  # its round, when the joiner replanned (`--replan`)


@dataclass
class _Progress:
    """What the live area shows, updated by events and read by rich's refresh thread under `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    waiting_for: str = ""  # what the spinner says before the agents run: the coordinator, Ray's start-up
    waiting_since: float | None = None
    coordinator_tokens: int = 0
    early_starts: dict[AgentPath, AgentStarted] = field(default_factory=dict)  # agents started while the plan was written
    rows: list[_Row] = field(default_factory=list)
    slots: int | None = None
    sinks: set[AgentPath] = field(default_factory=set)
    streamed: list[str] = field(default_factory=list)  # the final agent's answer so far
    started: float = field(default_factory=time.monotonic)


class LiveView:
    """An event handler that draws a run live in a terminal; use it as a context manager so the live area always ends."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.lines = ConsoleView()  # prints to sys.stdout, which the live area redirects above itself
        self.progress = _Progress()
        self.live = Live(
            console=self.console,
            get_renderable=self._render,
            refresh_per_second=REFRESH_PER_SECOND,
            transient=True,
            redirect_stdout=True,
            redirect_stderr=False,
        )

    def __enter__(self) -> LiveView:
        self.live.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.live.stop()

    def __call__(self, event: Event) -> None:
        progress = self.progress
        with progress.lock:
            if isinstance(event, PlanningStarted):
                progress.waiting_for, progress.waiting_since = "🧭 Coordinator planning", time.monotonic()
            elif isinstance(event, RayStarting):
                where = f"Connecting to Ray at {event.address}" if event.address else "Starting Ray"
                progress.waiting_for, progress.waiting_since, progress.coordinator_tokens = f"⚙️  {where}", time.monotonic(), 0
            elif isinstance(event, TokensArrived):
                self._tokens(event)
                return
            elif isinstance(event, PlanReady):
                progress.waiting_since = None
                progress.slots = event.slots
                progress.sinks = {ROOT.child(sink) for sink in event.plan.sinks()}
                progress.rows = _rows(event.plan, event.layers)
                for agent in event.reused:
                    progress.rows[agent].state = "reused"
                for row, number in zip(progress.rows, event.rounds):
                    row.round = number
                for early in progress.early_starts.values():
                    self._started(early)
            elif isinstance(event, SubPlanReady):
                self._add_sub_plan(event)
            elif isinstance(event, RoundStarted):
                self._add_round(event)
            elif isinstance(event, AgentStarted):
                if not progress.rows:
                    progress.early_starts[event.path] = event
                self._started(event)
            elif isinstance(event, AgentFinished):
                self._finished(event)
        if isinstance(event, RunFinished):
            self.live.stop()  # the live area goes; a still picture of the table stays above the final output
            self.console.print(self._table())
        self.lines(event)

    def _started(self, event: AgentStarted) -> None:
        row = self._row(event.path)
        if row is not None and row.state == "waiting":
            row.state, row.started, row.node = "running", time.monotonic(), event.node

    def _tokens(self, event: TokensArrived) -> None:
        progress = self.progress
        if event.path == COORDINATOR:
            progress.coordinator_tokens = event.tokens
            return
        row = self._row(event.path)
        if row is not None and row.state == "running":
            row.tokens = event.tokens
            if event.path in progress.sinks:
                progress.streamed.append(event.text)

    def _finished(self, event: AgentFinished) -> None:
        agent = event.agent
        row = self._row(agent.path)
        if row is None:
            return
        row.state = "reused" if agent.reused else agent.status
        if agent.started_at is not None and agent.finished_at is not None:
            row.seconds = agent.finished_at - agent.started_at
        if agent.tokens:
            row.tokens = agent.tokens.completion
        row.node = agent.node or row.node

    def _add_sub_plan(self, event: SubPlanReady) -> None:
        """The sub-plan's agents go right under their parent (after any earlier sub-rows); the parent holds no slot meanwhile."""
        rows = self.progress.rows
        parent = self._row(event.path)
        if parent is not None:
            parent.state = "delegated"
        position = next((index for index, row in enumerate(rows) if row.path == event.path), len(rows) - 1) + 1
        while position < len(rows) and rows[position].path.steps[: len(event.path.steps)] == event.path.steps:
            position += 1
        rows[position:position] = _rows(event.plan, event.layers, event.path)

    def _add_round(self, event: RoundStarted) -> None:
        """The new round's agents go last; the final answer that streams is now theirs."""
        progress = self.progress
        rows = _rows(event.plan, event.layers)
        progress.rows += [replace(rows[agent], round=event.number) for agent in event.added]
        progress.sinks = {ROOT.child(sink) for sink in event.plan.sinks() if sink in event.added}
        progress.streamed = []

    def _row(self, path: AgentPath) -> _Row | None:
        return next((row for row in self.progress.rows if row.path == path), None)

    def _render(self) -> RenderableType:
        with self.progress.lock:
            progress = self.progress
            if progress.waiting_since is not None:
                elapsed = time.monotonic() - progress.waiting_since
                tokens = f" · {progress.coordinator_tokens} tokens" if progress.coordinator_tokens else ""
                early = f" · {len(progress.early_starts)} agents started" if progress.early_starts else ""
                return Spinner("dots", Text(f"{progress.waiting_for} · {elapsed:.1f} s{tokens}{early}"))
            if not progress.rows:
                return Text("")
            parts: list[RenderableType] = [self._table(limit=max(self.console.height - STREAM_LINES - 8, 5)), self._bar()]
            if progress.streamed:
                tail = "".join(progress.streamed).splitlines()[-STREAM_LINES:]
                parts.append(Panel(Text("\n".join(tail)), title="📝 Final output (streaming)", title_align="left", border_style="dim"))
            return Group(*parts)

    def _state(self, row: _Row) -> str:
        """waiting / queued (its inputs are all there, it waits for a slot or a worker) / running / delegated / done states."""
        if row.state != "waiting":
            return row.state
        finished = {other.path for other in self.progress.rows if other.state in DONE}
        return "queued" if all(dep in finished for dep in row.depends_on) else "waiting"

    def _table(self, limit: int | None = None) -> Table:
        rows = self.progress.rows
        nodes = {row.node for row in rows if row.node}
        table = Table(box=None, pad_edge=False, header_style="bold")
        for name, justify in (
            ("agent", "left"),
            ("role", "left"),
            ("layer", "right"),
            ("state", "left"),
            ("time", "right"),
            ("tokens", "right"),
            ("tok/s", "right"),
        ):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        if len(nodes) > 1:
            table.add_column("node")
        rounds = max((row.round for row in rows), default=1) > 1
        if rounds:
            table.add_column("round", justify="right")
        shown = rows
        if limit is not None and len(rows) > limit:  # a big plan: keep what is still going on in view
            shown = [row for row in rows if row.state not in DONE][:limit]
        now = time.monotonic()
        for row in shown:
            seconds = row.seconds if row.seconds is not None else (now - row.started if row.started is not None else None)
            state = self._state(row)
            rate = f"{row.tokens / seconds:.1f}" if row.tokens and seconds else ""
            cells = [
                Text("  " * row.path.depth + str(row.path)),
                Text(row.role),
                Text(str(row.layer), style=f"on {colour(row.layer)} black"),
                Text(state, style=STATE_STYLE.get(state, "")),
                f"{seconds:.1f} s" if seconds is not None else "",
                str(row.tokens) if row.tokens else "",
                rate,
            ]
            if len(nodes) > 1:
                cells.append(row.node[:8])
            if rounds:
                cells.append(str(row.round))
            table.add_row(*cells)
        if len(shown) < len(rows):
            table.add_row(Text(f"… {len(rows) - len(shown)} finished agents not shown", style="dim"))
        return table

    def _bar(self) -> RenderableType:
        progress = self.progress
        rows = progress.rows
        done = sum(row.state in DONE for row in rows)
        running = sum(row.state == "running" for row in rows)
        slots = f" · slots {running}/{progress.slots} in use" if progress.slots else f" · {running} running"
        line = Table.grid(padding=(0, 1))
        line.add_row(
            ProgressBar(total=len(rows), completed=done, width=30),
            Text(f"{done}/{len(rows)} agents done{slots} · {time.monotonic() - progress.started:.1f} s"),
        )
        return line


def _rows(plan: ExecutionPlan, layers: list[list[int]], parent: AgentPath = ROOT) -> list[_Row]:
    layer_of = {agent: number for number, layer in enumerate(layers) for agent in layer}
    return [
        _Row(path=parent.child(index), role=spec.role.value, layer=layer_of[index], depends_on=[parent.child(dep) for dep in spec.depends_on])
        for index, spec in enumerate(plan.agents)
    ]
