"""The driver's side of a run: its executors, its planning route, the record and how a run ends.

The driver hands the plan's agents to the run hub (hub.py), which submits and supervises them, and
then only follows the run's event stream (follow.py), to report progress and checkpoint the
record. Every run takes one planning route: the plan is written in a thread of the driver while
the executors start and the main thread follows the stream. Streamed, each agent goes to the hub
the moment the coordinator's answer makes it safe to start (plan_stream.py); a plan not streamed
(`--no-stream-plan`, a plan file, a resumed record) is a stream that arrives at once, whose agents
all go to the hub when it is complete. The record is made once the plan is complete. With
`--replan`, once a round's agents have finished the joiner (coordinator.py) judges them in the
driver, and the agents it adds go to the same hub run as the next round, taking the earlier
agents' results the hub still holds.
"""

from __future__ import annotations

import logging
import shlex
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

import ray
from ray.actor import ActorHandle

from .connect import RayOptions, embedded, ensure_ray
from .coordinator import Joiner, planned_notice
from .events import (
    COORDINATOR,
    EventHandler,
    Notice,
    PlanningStarted,
    PlanReady,
    RoundStarted,
    RunFinished,
    TokenCounter,
)
from .executors import Executor, Policy, release_executors, start_executors, wait_started
from .follow import EventFollower, NoNodeLeft
from .hub import AgentOrder, PlanComplete, RunChannel, RunHub, StopRequested, Submission, agent_order, plan_orders, run_hub, served_hub
from .interrupts import exit_code, run_ended, stop_signals_ignored, stop_signals_interrupt
from .llm import LLMConfig, TextCallback
from .paths import ROOT
from .plan import ExecutionPlan
from .plan_stream import ReadyAgent, StreamedPlan
from .record import (
    AgentRecord,
    CoordinatorRecord,
    FailureKind,
    RecordedLLM,
    RunRecord,
    RunState,
    kept_agents,
    walk_agents,
)
from .resources import SLOT_RESOURCE
from .run_directory import NOT_SAVED, RunDirectoryError, RunFiles
from .settings import Limits
from .stops import PlanningInterrupted, RunBroken, RunInterrupted
from .tracing import Exporting, RunSpan, continued

log = logging.getLogger(__name__)

# The coordinator's call, given where its answer streams to and what to call when an answer is rejected;
# a plan already whole answers at once, with no coordinator record (`whole_plan`).
Planner = Callable[[TextCallback, Callable[[str], None]], tuple[ExecutionPlan, CoordinatorRecord | None]]


class RunStop:
    """Stops a run from another thread the way Ctrl-C does (status interrupted, resumable): the service's DELETE.

    Signals reach only the main thread, and a service runs many runs in threads; the stop travels
    through the run's own event stream instead, so the run's driver ends it on its Ctrl-C path.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channel: RunChannel | None = None
        self.requested = False

    def attach(self, channel: RunChannel) -> None:
        """The run's channel (again, after a restart); a stop asked before it existed is sent now."""
        with self._lock:
            self._channel = channel
            if self.requested:
                channel.post(StopRequested())

    def __call__(self) -> None:
        with self._lock:
            self.requested = True
            if self._channel is not None:
                self._channel.post(StopRequested())


def share_slots(slots: int | None, policy: Policy) -> int:
    """From now on every run of this process takes its LLM slots from one pool: `slots` of the cluster's (all
    when None) on executors started once, its agents waiting in one queue across runs ordered by `policy`.
    How `metaagent serve` runs many runs without them each believing they own every slot. Returns the slots."""
    executors = start_executors(slots)
    wait_started(executors)
    ray.get(run_hub(served=True).share_slots.remote(executors, policy))
    total = sum(executor.slots for executor in executors)
    _shared[ray.get_runtime_context().get_job_id()] = total
    return total


_shared: dict[str, int] = {}  # Ray job id -> the slots its runs share (`share_slots`)


def _shared_hub() -> tuple[ActorHandle[RunHub] | None, int | None]:
    """Whose slots a run shares: this process's (a service's own runs: its hub, None here), a service's on the
    cluster (its hub and slots), or none (None, None: the run starts executors of its own)."""
    shared = _shared.get(ray.get_runtime_context().get_job_id())
    if shared is not None:
        return None, shared
    served = None if embedded() else served_hub()  # a Ray this process started has no service but its own
    return (None, None) if served is None else served


def whole_plan(plan: ExecutionPlan) -> Planner:
    """A plan already whole (a plan file, a resumed record): the planning route's stream, arriving at once."""
    return lambda on_text, on_rejected: (plan, None)


def execute_plan(
    plan: ExecutionPlan,
    query: str,
    llm: LLMConfig,
    *,
    ray_options: RayOptions,
    limits: Limits,
    on_event: EventHandler,
    run_dir: RunFiles = NOT_SAVED,
    coordinator: CoordinatorRecord | None = None,
    settings: dict[str, Any] | None = None,
    earlier: RunRecord | None = None,
    stream: bool = False,
    trace: Exporting | None = None,
    joiner: Joiner | None = None,
    stop: RunStop | None = None,
) -> RunRecord:
    """Run every agent of `plan` on Ray and return the record; `run_dir` (whose lock the caller holds) keeps what
    the agents do as they finish. The planning route of `plan_and_execute`, with a plan that arrives at once.

    When resuming, `earlier` is the record being resumed: what `resume_choice` keeps of it is not
    run again, and its rounds go on. With `stream`, agents' tokens arrive as `TokensArrived` events while
    they answer. With a `joiner`, it judges each round's results and may replan (`--replan`).
    A stop signal raises RunInterrupted and a dead Ray process RunBroken, both after the record is
    saved with its final status. With `trace`, the run is exported as an OpenTelemetry trace (tracing.py).
    `stop` ends the run from another thread as a stop signal does.
    """
    with _Run(llm, ray_options, limits, on_event, stream, trace, stop) as run:
        plan, _, started = run.plan(query, whole_plan(plan), max_agents=len(plan.agents), stream_plan=False)
        return run.execute(plan, query, run_dir, coordinator, settings or {}, earlier, joiner, already_submitted=started)


def plan_and_execute(
    query: str,
    planner: Planner,
    llm: LLMConfig,
    *,
    max_agents: int,
    ray_options: RayOptions,
    limits: Limits,
    on_event: EventHandler,
    run_dir: Callable[[], RunFiles],
    settings: dict[str, Any] | None = None,
    stream: bool = False,
    stream_plan: bool = True,
    planning: PlanningStarted | None = None,
    trace: Exporting | None = None,
    joiner: Joiner | None = None,
    stop: RunStop | None = None,
) -> RunRecord:
    """Plan with the coordinator and run the plan; with `stream_plan`, each agent as soon as the answer makes it safe.

    The executors start while the coordinator writes; `run_dir` is called (and locked) once the plan
    is complete. When the finished plan does not keep what started early (a cycle, a rejected
    answer), that is cancelled, set aside and said, and the plan runs from the start. `planning` is
    said as the coordinator starts: from then on a stop signal is one that interrupted the planning.
    With `trace`, the run is exported as an OpenTelemetry trace (tracing.py). `stop` ends it from another thread.
    """
    with _Run(llm, ray_options, limits, on_event, stream, trace, stop) as run:
        plan, coordinator, started = run.plan(query, planner, max_agents=max_agents, stream_plan=stream_plan, planning=planning)
        directory = run_dir()
        with directory.locked():
            return run.execute(plan, query, directory, coordinator, settings or {}, None, joiner, already_submitted=started)


class _Run:
    """One run seen from the driver: its executors, its hub run, and the event stream it follows."""

    def __init__(
        self,
        llm: LLMConfig,
        ray_options: RayOptions,
        limits: Limits,
        on_event: EventHandler,
        stream: bool,
        trace: Exporting | None,
        stop: RunStop | None,
    ) -> None:
        self.connection = ensure_ray(ray_options, llm)  # the API connects first, so a run that cannot start leaves nothing on disk
        self.llm, self.ray_options, self.limits, self.on_event, self.stream = llm, ray_options, limits, on_event, stream
        self.span = RunSpan(trace, llm)
        self.stop = stop
        self.hub, self.shared_slots = _shared_hub()
        if self.hub is not None:
            on_event(Notice(f"🤝 Sharing the {self.shared_slots} LLM slots of the metaagent serve service on this cluster (--slots does not apply)"))
        self.executors: list[Executor] = []
        self.abandoned_calls = False
        self._open()

    def _open(self) -> None:
        """Start the executors (they start while the caller goes on), unless runs share them, and open the run in the hub."""
        if self.shared_slots is None:
            self.executors = start_executors(self.ray_options.slots)
        self.submission = Submission(run_id=uuid.uuid4().hex, llm=self.llm, limits=self.limits, stream=self.stream, trace=self.span.parent)
        self.channel = RunChannel(self.submission, None if self.shared_slots is not None else self.executors, self.hub)
        self.follower = EventFollower(self.channel, self.on_event)
        if self.stop is not None:
            self.stop.attach(self.channel)

    def _close(self, *, keep: bool = False) -> None:
        """End the run in the hub; keep its executors for the next run when `keep`, else stop them (shared ones stay)."""
        self.channel.forget()
        if self.shared_slots is None:
            release_executors(self.executors, self.ray_options.slots, keep=keep)

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, error_type: type[BaseException] | None, *exc_info: object) -> None:
        # A run that ended cleanly on a Ray of this process's own leaves its executors started for the
        # next one, unless a call it gave up on (a timeout) may still hold a thread. A further Ctrl-C
        # cannot cut this short: the run's end is already decided.
        with stop_signals_ignored():
            self._close(keep=error_type is None and embedded() and not self.abandoned_calls)
            self.span.end(error_type)

    def executors_started(self) -> None:
        """Wait until the executors hold their slots: a run that cannot get them stops before anything is written."""
        if self.shared_slots is None:
            wait_started(self.executors)

    def _submit(self, orders: list[AgentOrder]) -> None:
        """Hand the hub these agents; waited for, so a fault in submitting them ends the run instead of leaving it waiting."""
        self.channel.submit(orders)

    def plan(
        self, query: str, planner: Planner, *, max_agents: int, stream_plan: bool, planning: PlanningStarted | None = None
    ) -> tuple[ExecutionPlan, CoordinatorRecord | None, set[int]]:
        """Let the planner write in a thread while the executors start; returns the plan, its coordinator record and who started.

        With `stream_plan` agents start from the coordinator's answer as it makes them safe; without, the
        plan is a stream that arrives at once: nothing starts before it is complete.
        """
        streamed = StreamedPlan(max_agents=max_agents)
        outcome: dict[str, Any] = {}
        channel = self.channel
        tokens = TokenCounter(COORDINATOR, channel.post) if self.stream else None

        def on_text(piece: str) -> None:
            if tokens is not None:
                tokens(piece)
            if not stream_plan:
                return
            ready = streamed.feed(piece)
            if ready and not outcome:
                # Waited for, so the hub has every early agent before it hears that the plan is complete.
                channel.submit([self._order(query, agent, streamed) for agent in ready])

        def coordinate() -> None:
            try:
                with continued(self.span.parent, self.llm):  # the `plan` span, under the run's, when it is traced
                    outcome["plan"] = planner(on_text, streamed.discard)
            except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
                outcome["error"] = error
            channel.post(PlanComplete())

        coordinator = threading.Thread(target=coordinate, name="metaagent-coordinator", daemon=True)
        try:
            with stop_signals_interrupt():
                if planning is not None:
                    self.on_event(planning)
                coordinator.start()
                self.executors_started()
                self.follower.until_planned()
        except KeyboardInterrupt as interrupt:
            outcome.setdefault("stopped", interrupt)  # the coordinator's thread starts nothing more
            with stop_signals_ignored():
                channel.cancel()
            raise PlanningInterrupted(exit_code(interrupt), planned="plan" in outcome and outcome["plan"][1] is None) from None
        except BaseException:
            outcome.setdefault("stopped", True)
            raise
        if "error" in outcome:
            channel.cancel()
            raise outcome["error"]
        plan, record = outcome["plan"]
        if record is None:  # a plan already whole: no coordinator spoke, nothing started early
            return plan, None, set()
        self.on_event(planned_notice(plan, record))
        started = set(streamed.started)
        record.streamed, record.started_early = stream_plan, sorted(started)
        why = streamed.disagreement(plan) if started else None
        if why is not None:
            record.set_aside = why
            warning = f"⚠️ {len(started)} agents started while the coordinator wrote its plan were cancelled and set aside: {why}"
            plan.add_warning(warning)
            self._restart()
            started = set()
        return plan, record, started

    def _order(self, query: str, agent: ReadyAgent, streamed: StreamedPlan) -> AgentOrder:
        """The order for an agent the streamed plan made safe to start: the finished plan gives the same."""
        return agent_order(
            ROOT.child(agent.agent_id),
            agent.spec,
            query=query,
            llm=self.llm,
            limits=self.limits,
            depth=0,
            layer=agent.layer,
            priority=agent.priority,
        )

    def _next_round(self, joiner: Joiner, record: RunRecord, query: str, run_dir: RunFiles) -> bool:
        """The joiner judges the last round; when it replans, the new agents go to the hub as the next round
        (their dependencies on earlier agents take the results the hub holds). Returns whether it replanned."""
        number = len(record.rounds)
        self.on_event(Notice(f"🔁 Joiner reading round {number}'s results..."))
        plan, judged = joiner(record)
        record.rounds[-1].joiner = judged
        run_dir.record_changed()
        if judged.decision is None:
            self._warn(record, f"⚠️ The joiner gave no valid decision ({judged.errors[-1]}); the run finishes as it is")
            return False
        if plan is None:
            self.on_event(Notice(f"🔁 Joiner finished after round {number}: {judged.reason}"))
            return False
        for warning in plan.warnings:
            self._warn(record, warning)
        added = record.add_round(plan)
        run_dir.round_added(record)
        self.on_event(RoundStarted(number=number + 1, reason=judged.reason, plan=plan, layers=record.layers, added=added))
        self._submit(plan_orders(plan, query, self.llm, self.limits, only=set(added)))
        return True

    def _warn(self, record: RunRecord, warning: str) -> None:
        record.warnings.append(warning)
        self.on_event(Notice(warning, warning=True))

    def _restart(self) -> None:
        """Cancel everything of this run and start afresh: what started early keeps no slot and leaves no result."""
        self.channel.cancel()
        self._close()
        self._open()
        self.executors_started()

    def execute(
        self,
        plan: ExecutionPlan,
        query: str,
        run_dir: RunFiles,
        coordinator: CoordinatorRecord | None,
        settings: dict[str, Any],
        earlier: RunRecord | None,
        joiner: Joiner | None,
        already_submitted: set[int] | None = None,
    ) -> RunRecord:
        """Submit the plan's agents (all but those already submitted) and follow them to the end; then, while the
        joiner may replan and does, each round's new agents."""
        record = RunRecord.start(
            plan,
            query,
            llm=RecordedLLM(backend=self.llm.backend, model=self.llm.model),
            settings=settings,
            slots=self.shared_slots or self.ray_options.slots or int(ray.cluster_resources().get(SLOT_RESOURCE, 0)) or None,
            coordinator=coordinator,
            ray_started_at=self.connection.started_at,
            ray_ready_at=self.connection.ready_at,
            rounds=[round_.model_copy(deep=True) for round_ in earlier.rounds] if earlier is not None else [],
        )
        kept: dict[int, AgentRecord] = {}
        if earlier is not None:
            kept = kept_agents(plan, earlier.agents, earlier.settled_agents())
            for agent_id, agent in kept.items():
                record.agents[agent_id] = earlier.agents[agent_id].model_copy(update={"reused": agent.reused}, deep=True)
        run_dir.start(record)
        reused = tuple(sorted(index for index, agent in kept.items() if agent.reused))
        rounds = tuple(record.round_of()[agent] for agent in range(len(plan.agents))) if len(record.rounds) > 1 else ()
        self.on_event(PlanReady(plan=plan, layers=record.layers, run_dir=record.run_dir, slots=record.slots, reused=reused, rounds=rounds))

        saved = f" in {run_dir.path}; resume with: metaagent resume {shlex.quote(str(run_dir.path))}" if run_dir.path else ""
        try:
            with stop_signals_interrupt():
                rest = set(range(len(plan.agents))) - (already_submitted or set())
                self._submit(plan_orders(plan, query, self.llm, self.limits, kept=kept, only=rest))
                self.follower.until_done(record, run_dir)
                while joiner is not None and joiner.may_replan(record) and self._next_round(joiner, record, query, run_dir):
                    self.follower.until_done(record, run_dir)
        except KeyboardInterrupt as interrupt:
            with stop_signals_ignored():
                self.channel.cancel()
                _end_run(record, run_dir, "interrupted")
            raise RunInterrupted(f"interrupted; the agents that finished are saved{saved}", record, exit_code(interrupt)) from None
        except ray.exceptions.RayError as error:
            _end_run(record, run_dir, "failed")
            raise RunBroken(f"{_what_died(error)}; the agents that finished are saved{saved}", record, 1) from None
        except NoNodeLeft as lost:  # the hub fails the agents still waiting for a slot
            _end_run(record, run_dir, "failed")
            raise RunBroken(f"{lost}; the agents that finished are saved{saved}", record, 1) from None
        except RunDirectoryError:  # the run can no longer be kept (a full disk): its agents stop with it
            with stop_signals_ignored():
                self.channel.cancel()
            raise
        run_ended()  # every agent has finished: a stop signal now could only lose the record
        with stop_signals_ignored():
            _end_run(record, run_dir, record.outcome())
            self.span.finish(record)
            self.abandoned_calls = any(agent.failure is FailureKind.TIMED_OUT for agent in walk_agents(record.agents))
            self.on_event(RunFinished(record=record))
        return record


def _what_died(error: ray.exceptions.RayError) -> str:
    """One line naming the Ray part whose loss ended the run (details with -v)."""
    log.debug("the run lost a Ray process", exc_info=error)
    if isinstance(error, ray.exceptions.ActorDiedError):
        return "the run's hub actor died (it supervises the agents and reports their progress)"
    first = next(iter(str(error).splitlines()), "")
    return f"a Ray process of this run died ({type(error).__name__}: {first})"


def write_ray_timeline(path: Path) -> None:
    """Ray's own chrome trace (`ray.timeline`) of every task this Ray instance ran: open it in chrome://tracing or Perfetto."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ray.timeline(filename=str(path))


def _end_run(record: RunRecord, run_dir: RunFiles, status: RunState) -> None:
    """The run ended with `status`: its record says so, and its files keep everything it leaves."""
    record.end(status)
    run_dir.finish(record)
