"""Submits a run's agents and follows them to the end: the hub, the driver's loop, the record.

The driver submits every agent at once, in topological order, each with the ObjectRefs of its
dependencies' results as its inputs. There are no layer barriers and no `ray.get` between
submissions: afterwards the driver only waits (`ray.wait`) on the run's event stream, to report
progress and checkpoint the record.

Each agent is supervised by the run hub, an async actor that holds no slot: once the agent's
inputs are ready it takes a free slot on one of the run's executors (executors.py), longest
remaining path first, bounds the call by a deadline, runs the agent again when its executor died,
and, when the agent delegated, runs the sub-plan and waits for it. Dependents take the supervised
result, so an agent never holds an LLM slot while it waits for others.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .agents import BACKOFF_MAX_S, AgentContext, AgentLimits, AgentResult
from .connect import RayOptions, ensure_ray
from .errors import MetaAgentError
from .events import (
    AgentFinished,
    AgentStarted,
    Event,
    EventHandler,
    Notice,
    PlanReady,
    RunFinished,
    SubPlanReady,
    TokensArrived,
)
from .executors import Executor, SlotPool, start_executors, stop_executors
from .interrupts import exit_code, stop_signals_ignored, stop_signals_interrupt
from .llm import LLMConfig
from .plan import AgentSpec, ExecutionPlan
from .record import (
    AgentRecord,
    CoordinatorRecord,
    RunDirectory,
    RunRecord,
    SubRunRecord,
    agent_records,
    compose_final_output,
    resume_choice,
)
from .resources import SLOT_RESOURCE

# The executor running an agent died (its process, and Ray restarts it) or cannot come back (its node is gone).
EXECUTOR_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError)
CHECKPOINT_INTERVAL_S = 1.0  # the most a run killed outright can lose of its record
RAY_TASK_RETRIES = 3  # further executions of an agent whose executor died mid-call
DEADLINE_GRACE_S = 5.0
log = logging.getLogger(__name__)


class RunStopped(MetaAgentError):
    """The run ended before its agents did; what finished is saved in `record` (and its run directory)."""

    def __init__(self, message: str, record: RunRecord, exit_code: int) -> None:
        super().__init__(message)
        self.record = record
        self.exit_code = exit_code


class RunInterrupted(RunStopped):
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP) ended the run: status `interrupted`, exit 128 + the signal."""


class RunBroken(RunStopped):
    """A Ray process the run needs (its hub actor, a raylet) died: status `failed`, exit 1."""


@dataclass(frozen=True)
class RunLimits:
    """Bounds on one run: per agent (tries, time, tokens, failure policy, depth) and for the whole tree."""

    agent: AgentLimits
    max_total_agents: int

    def deadline(self) -> float | None:
        """How long one agent's task may run before it is cancelled: every try, and the backoff between."""
        call = self.agent.call_timeout
        if call is None:
            return None
        return call * (self.agent.retries + 1) + BACKOFF_MAX_S * self.agent.retries + DEADLINE_GRACE_S


@dataclass(frozen=True)
class _Submission:
    """What it takes to submit agents the way the driver did: shared by a run and its sub-plans."""

    run_id: str
    llm: LLMConfig
    limits: RunLimits
    stream: bool = False  # agents stream their answers to the driver as `TokensArrived` events


def submit_plan(
    plan: ExecutionPlan,
    query: str,
    submission: _Submission,
    hub: Any,
    *,
    prefix: str = "",
    kept: dict[int, AgentResult] | None = None,
) -> dict[int, ray.ObjectRef]:
    """Submit every agent of `plan` (no waiting); returns each agent's supervised result.

    Each agent's inputs are the ObjectRefs of its dependencies' results; the hub runs it once they
    are ready. `kept` holds what a resume keeps: an `ok` result goes straight to the agent's
    dependents without running it; a `delegated` one continues its sub-plan without a new LLM call.
    """
    kept = kept or {}
    layer_of = plan.layer_of()
    remaining = plan.remaining_path()
    refs: dict[int, ray.ObjectRef] = {}
    for agent_id in plan.topological_order():
        earlier = kept.get(agent_id)
        if earlier is not None and earlier.status == "ok":
            refs[agent_id] = ray.put(earlier)
            continue
        spec = plan.agents[agent_id]
        context = AgentContext(
            agent_id=agent_id,
            spec=spec,
            query=query,
            llm=submission.llm,
            limits=submission.limits.agent,
            depth=plan.depth,
            path=f"{prefix}{agent_id}",
            layer=layer_of[agent_id],
            submitted_at=time.time(),
        )
        dependency_specs = {dep: plan.agents[dep] for dep in spec.depends_on}
        # Refs inside a list are passed as refs, not awaited: the hub waits for them itself.
        dependency_refs = [refs[dep] for dep in spec.depends_on]
        refs[agent_id] = hub.supervise.remote(submission, context, dependency_specs, remaining[agent_id], dependency_refs, earlier)
    return refs


def kept_results(plan: ExecutionPlan, agents: list[AgentRecord]) -> dict[int, AgentResult]:
    """What a resume keeps of these agents (see `resume_choice`), as results the runtime submits."""
    reuse, resume = resume_choice(plan, agents)
    kept = {index: AgentResult(agent_id=index, role=agents[index].role, status="ok", output=agents[index].output, reused=True) for index in reuse}
    for index in resume:
        agent, sub_run = agents[index], agents[index].sub_run
        assert sub_run is not None
        kept[index] = AgentResult(
            agent_id=index,
            role=agent.role,
            status="delegated",
            started_at=agent.started_at,
            attempts=agent.attempts,
            sub_plan=sub_run.plan,
            sub_query=sub_run.query,
            sub_resume=kept_results(sub_run.plan, sub_run.agents),
        )
    return kept


@dataclass(frozen=True)
class _AgentDone:
    """Hub to driver: an agent (of the plan or of a sub-plan) has its final result; the driver records it."""

    path: str
    result: AgentResult


@ray.remote(num_cpus=0, max_concurrency=100_000)
class _RunHub:
    """Per driver: supervises agents (deadline, crashes, delegation) and streams events to drivers.

    Async, so thousands of supervisions wait concurrently in one process without holding any slot.
    """

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Queue[Event | _AgentDone | None]] = {}  # None ends a run's stream
        self._executions: dict[tuple[str, str], int] = {}
        self._started: dict[tuple[str, str], asyncio.Event] = {}
        self._started_at: dict[tuple[str, str], float] = {}
        self._work: dict[str, list[ray.ObjectRef]] = {}
        self._total: dict[str, int] = {}
        self._executors: dict[str, list[Executor]] = {}
        self._slots: dict[str, SlotPool] = {}

    def _queue(self, run_id: str) -> asyncio.Queue[Event | _AgentDone | None]:
        return self._events.setdefault(run_id, asyncio.Queue())

    def _publish(self, run_id: str, event: Event | _AgentDone) -> None:
        self._queue(run_id).put_nowait(event)

    def _start_signal(self, run_id: str, path: str) -> asyncio.Event:
        return self._started.setdefault((run_id, path), asyncio.Event())

    async def open_run(self, run_id: str, agents: int, executors: list[Executor]) -> None:
        self._total[run_id] = agents
        self._work[run_id] = []
        self._executors[run_id] = executors
        self._slots[run_id] = SlotPool({index: executor.slots for index, executor in enumerate(executors)})

    async def started(self, run_id: str, path: str, role: str, pid: int, node: str) -> int:
        """An agent's work began (again, if Ray retried it); returns which execution this is."""
        execution = self._executions.get((run_id, path), 0) + 1
        self._executions[(run_id, path)] = execution
        self._started_at.setdefault((run_id, path), time.time())
        self._start_signal(run_id, path).set()
        self._publish(run_id, AgentStarted(path=path, role=role, attempt=execution, pid=pid, node=node))
        return execution

    async def progress(self, run_id: str, event: TokensArrived) -> None:
        """An agent's streamed tokens, for the driver's live view (dropped once the run is over)."""
        if run_id in self._events:
            self._publish(run_id, event)

    async def next_batch(self, run_id: str) -> list[Event | _AgentDone]:
        queue = self._queue(run_id)
        events = [await queue.get()]
        while not queue.empty():
            events.append(queue.get_nowait())
        return [event for event in events if event is not None]

    async def cancel(self, run_id: str) -> None:
        """Stop every agent of the run (Ctrl-C); the driver then ends the executors, and any call in them."""
        for work in self._work.get(run_id, []):
            ray.cancel(work)

    async def forget(self, run_id: str) -> None:
        """The run is over: release its waiting `next_batch` and everything kept for it."""
        self._queue(run_id).put_nowait(None)
        self._events.pop(run_id)
        self._work.pop(run_id, None)
        self._total.pop(run_id, None)
        self._executors.pop(run_id, None)
        self._slots.pop(run_id, None)
        for table in (self._executions, self._started, self._started_at):
            for key in [key for key in table if key[0] == run_id]:
                del table[key]

    async def supervise(
        self,
        submission: _Submission,
        context: AgentContext,
        dependency_specs: dict[int, AgentSpec],
        priority: int,
        dependency_refs: list[ray.ObjectRef],
        kept: AgentResult | None,
    ) -> AgentResult:
        """The agent's final result: its work's once its inputs are ready, or its sub-plan's when it delegated.

        Whatever happens, the driver hears of it: a fault here fails this agent, never hangs the run.
        """
        try:
            if dependency_refs:
                await asyncio.wait([asyncio.wrap_future(ref.future()) for ref in dependency_refs])
            if kept is not None:  # a resumed agent continues its unfinished sub-plan
                result = kept
            else:
                result = await self._execute(submission, context, dependency_specs, priority, dependency_refs)
            if result.status == "delegated" and result.sub_plan is not None:
                result = await self._delegate(submission, context, dependency_specs, priority, dependency_refs, result)
        except Exception as error:  # noqa: BLE001 - reported as the agent's error
            log.exception("supervising agent %s failed", context.label)
            result = self._failure(submission.run_id, context, f"the agent's supervision failed: {type(error).__name__}: {error}")
        self._publish(submission.run_id, _AgentDone(context.label, result))
        return result

    async def _execute(
        self, submission: _Submission, context: AgentContext, dependency_specs: dict[int, AgentSpec], priority: int, inputs: list[ray.ObjectRef]
    ) -> AgentResult:
        """Run the agent on an executor with a free slot; an execution lost with its executor is tried again."""
        run_id = submission.run_id
        slots, executors = self._slots[run_id], self._executors[run_id]
        while True:
            index = await slots.acquire(priority)
            work = executors[index].actor.run.remote(context, dependency_specs, ray.get_runtime_context().current_actor, run_id, submission.stream, *inputs)
            self._work[run_id].append(work)
            try:
                result = await self._await_work(submission, context, work)
            except EXECUTOR_LOST as error:
                slots.release(index)
                if isinstance(error, ray.exceptions.ActorUnschedulableError) or not _node_alive(executors[index].node):
                    slots.drop(index)  # its node is gone, and its slots with it
                executions = self._executions.get((run_id, context.label), 1)
                if executions > RAY_TASK_RETRIES or not slots.executors:
                    return self._failure(run_id, context, f"the agent's executor died {executions} times: {type(error).__name__}")
                continue
            if result.status == "failed" and result.error and result.error.startswith("timed out"):
                asyncio.ensure_future(_release_when_done(work, slots, index))  # the call still holds its thread
            else:
                slots.release(index)
            return result

    async def _await_work(self, submission: _Submission, context: AgentContext, work: ray.ObjectRef) -> AgentResult:
        """Wait for the work; once it has started, give it `deadline` seconds before giving up on it."""
        done = asyncio.ensure_future(asyncio.wrap_future(work.future()))
        deadline = submission.limits.deadline()
        try:
            if deadline is not None:
                started = asyncio.ensure_future(self._start_signal(submission.run_id, context.label).wait())
                await asyncio.wait([done, started], return_when=asyncio.FIRST_COMPLETED)
                started.cancel()
                await asyncio.wait_for(asyncio.shield(done), timeout=deadline)
            return await done
        except asyncio.TimeoutError:
            ray.cancel(work)
            return self._failure(submission.run_id, context, f"timed out: no result within {deadline:g} s (--agent-timeout); the agent was abandoned")
        except EXECUTOR_LOST:
            raise
        except ray.exceptions.RayError as error:
            detail = next(iter(str(error).splitlines()), "")
            return self._failure(submission.run_id, context, f"the agent's Ray task failed: {type(error).__name__}" + (f": {detail}" if detail else ""))

    def _failure(self, run_id: str, context: AgentContext, error: str) -> AgentResult:
        """A work task that never returned: each execution Ray made counts as a try."""
        key = (run_id, context.label)
        return AgentResult(
            agent_id=context.agent_id,
            role=context.spec.role.value,
            status="failed",
            error=error,
            attempts=max(1, self._executions.get(key, 0)),
            submitted_at=context.submitted_at,
            started_at=self._started_at.get(key),
            finished_at=time.time(),
        )

    async def _delegate(
        self,
        submission: _Submission,
        context: AgentContext,
        dependency_specs: dict[int, AgentSpec],
        priority: int,
        dependency_refs: list[ray.ObjectRef],
        parent: AgentResult,
    ) -> AgentResult:
        """Run the agent's sub-plan as Ray tasks like any other; its final output becomes the agent's."""
        plan, run_id = parent.sub_plan, submission.run_id
        assert plan is not None
        me = ray.get_runtime_context().current_actor
        limit = submission.limits.max_total_agents
        if self._total.get(run_id, 0) + len(plan.agents) > limit:
            warning = f"⚠️ Agent {context.label}: not delegating to {len(plan.agents)} more agents, the run would exceed --max-total-agents {limit}; it answers itself"
            self._publish(run_id, Notice(warning, warning=True))
            alone = replace(context, delegation_allowed=False)
            result = await self._execute(submission, alone, dependency_specs, priority, dependency_refs)
            result.warnings = [*parent.warnings, warning]
            return result
        self._total[run_id] = self._total.get(run_id, 0) + len(plan.agents)
        layers = plan.get_execution_layers()
        self._publish(run_id, SubPlanReady(path=context.label, query=parent.sub_query, plan=plan, layers=layers))
        sub_refs = submit_plan(plan, parent.sub_query, submission, me, prefix=f"{context.label}.", kept=parent.sub_resume)
        sub_results = list(await asyncio.gather(*(asyncio.wrap_future(sub_refs[index].future()) for index in range(len(plan.agents)))))
        records = agent_records(plan, prefix=f"{context.label}.")
        for record, result in zip(records, sub_results):
            apply_result(record, result)
        sinks_ok = all(sub_results[index].status == "ok" for index in plan.sinks())
        parent.status = "ok" if sinks_ok else "failed"
        parent.error = None if sinks_ok else "its sub-plan's final agent did not succeed"
        parent.output = compose_final_output(plan, records)
        parent.sub_results = sub_results
        parent.sub_resume = {}
        parent.warnings = [*parent.warnings, *plan.warnings]
        parent.finished_at = time.time()
        return parent


_hubs: dict[str, Any] = {}  # Ray job id -> its hub; holding the handle keeps the actor alive


def _run_hub() -> Any:
    """This driver's hub, created on first use."""
    context = ray.get_runtime_context()
    job = context.get_job_id()
    if job not in _hubs:
        # On the driver's node: losing another node must not lose the run's supervision.
        here = NodeAffinitySchedulingStrategy(node_id=context.get_node_id(), soft=False)
        _hubs[job] = _RunHub.options(scheduling_strategy=here).remote()
    return _hubs[job]


async def _release_when_done(work: ray.ObjectRef, slots: SlotPool, index: int) -> None:
    """Give back an abandoned agent's slot once its call really ends, so the cap stays exact."""
    await asyncio.wait([asyncio.wrap_future(work.future())])
    slots.release(index)


def _node_alive(node: str) -> bool:
    return any(entry["NodeID"] == node and entry["Alive"] for entry in ray.nodes())


def apply_result(agent: AgentRecord, result: AgentResult) -> None:
    """Copy what the agent's task measured into its record; sub-agents a resume kept stay as they were."""
    agent.status = result.status  # type: ignore[assignment]
    agent.output, agent.error = result.output, result.error
    agent.submitted_at, agent.started_at, agent.finished_at = result.submitted_at, result.started_at, result.finished_at
    agent.inputs_from = result.inputs_from
    agent.node, agent.attempts, agent.llm_ms, agent.reused = result.node, result.attempts, result.llm_ms, result.reused
    agent.repetition_cut = result.repetition_cut
    if result.prompt_tokens is not None or result.completion_tokens is not None:
        agent.tokens = {"prompt": result.prompt_tokens or 0, "completion": result.completion_tokens or 0}
    if result.sub_plan is not None and result.sub_results:
        if agent.sub_run is None:
            agent.sub_run = _sub_run(agent.path, result.sub_query, result.sub_plan)
        for sub_record, sub_result in zip(agent.sub_run.agents, result.sub_results):
            if sub_result.reused:
                sub_record.reused = True
            else:
                apply_result(sub_record, sub_result)


def _sub_run(path: str, query: str, plan: ExecutionPlan) -> SubRunRecord:
    """The record of a sub-plan about to run: every agent pending."""
    return SubRunRecord(query=query, plan=plan, layers=plan.get_execution_layers(), warnings=plan.warnings, agents=agent_records(plan, prefix=f"{path}."))


def execute_plan(
    plan: ExecutionPlan,
    query: str,
    llm: LLMConfig,
    *,
    ray_options: RayOptions,
    limits: RunLimits,
    on_event: EventHandler,
    run_dir: RunDirectory | None = None,
    coordinator: CoordinatorRecord | None = None,
    settings: dict[str, Any] | None = None,
    earlier: RunRecord | None = None,
    stream: bool = False,
) -> RunRecord:
    """Run every agent of `plan` on Ray and return the record; checkpoints `run_dir` as agents finish.

    When resuming, `earlier` is the record being resumed: what `resume_choice` keeps of it is not
    run again. With `stream`, agents' tokens arrive as `TokensArrived` events while they answer.
    A stop signal raises RunInterrupted and a dead Ray process RunBroken, both after the record is
    saved with its final status.
    """
    connection = ensure_ray(ray_options, llm)  # the API connects first, so a run that cannot start leaves nothing on disk
    executors = start_executors(ray_options.slots)  # slots are checked before anything is written
    record = RunRecord.start(
        plan,
        query,
        llm={"backend": llm.backend, "model": llm.model},
        settings=settings or {},
        slots=ray_options.slots or int(ray.cluster_resources().get(SLOT_RESOURCE, 0)) or None,
        run_dir=str(run_dir.path) if run_dir else None,
        coordinator=coordinator,
        ray_started_at=connection.started_at,
        ray_ready_at=connection.ready_at,
    )
    kept: dict[int, AgentResult] = {}
    if earlier is not None:
        kept = kept_results(plan, earlier.agents)
        for agent_id, result in kept.items():
            record.agents[agent_id] = earlier.agents[agent_id].model_copy(update={"reused": result.status == "ok"}, deep=True)
    if run_dir is not None:
        run_dir.write_plan(plan)
        run_dir.write_record(record)
    on_event(PlanReady(plan=plan, layers=record.layers, run_dir=record.run_dir, slots=record.slots, reused=tuple(sorted(index for index, result in kept.items() if result.status == "ok"))))

    hub = _run_hub()
    submission = _Submission(run_id=uuid.uuid4().hex, llm=llm, limits=limits, stream=stream)
    saved = f" in {run_dir.path}; resume with: metaagent resume {run_dir.path}" if run_dir else ""
    try:
        with stop_signals_interrupt():
            ray.get(hub.open_run.remote(submission.run_id, len(plan.agents), executors))
            refs = submit_plan(plan, query, submission, hub, kept=kept)
            _follow(record, hub, submission.run_id, run_dir, on_event)
            del refs  # held until every agent finished: dependents and the hub read them
    except KeyboardInterrupt as interrupt:
        with stop_signals_ignored():
            _cancel(hub, submission.run_id)
            _finish(record, run_dir, "interrupted")
        raise RunInterrupted(f"interrupted; the agents that finished are saved{saved}", record, exit_code(interrupt)) from None
    except ray.exceptions.RayError as error:
        _finish(record, run_dir, "failed")
        raise RunBroken(f"{_what_died(error)}; the agents that finished are saved{saved}", record, 1) from None
    finally:
        hub.forget.remote(submission.run_id)
        stop_executors(executors)
    _finish(record, run_dir, "ok" if not record.failed_agents() else "failed")
    on_event(RunFinished(record=record))
    return record


def _cancel(hub: Any, run_id: str) -> None:
    """Stop the run's agent tasks; a hub that is gone or slow cannot keep the stop from finishing."""
    try:
        ray.get(hub.cancel.remote(run_id), timeout=10)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        log.debug("cancelling the run's agents failed", exc_info=True)


def _what_died(error: ray.exceptions.RayError) -> str:
    """One line naming the Ray part whose loss ended the run (details with -v)."""
    log.debug("the run lost a Ray process", exc_info=error)
    if isinstance(error, ray.exceptions.ActorDiedError):
        return "the run's hub actor died (it supervises the agents and reports their progress)"
    first = next(iter(str(error).splitlines()), "")
    return f"a Ray process of this run died ({type(error).__name__}: {first})"


def _follow(record: RunRecord, hub: Any, run_id: str, run_dir: RunDirectory | None, on_event: EventHandler) -> None:
    """Report the hub's events as they happen until every agent has its result.

    The record is written at most once every CHECKPOINT_INTERVAL_S while agents finish (and by
    `_finish` at the end), so thousands of agents do not rewrite it thousands of times; a run
    killed outright loses at most that last interval.
    """
    waiting = {agent.path for agent in record.agents if not agent.reused}
    announced: dict[str, int] = {}  # agent path -> the latest execution whose start was reported
    checkpoints = _Checkpoints(record, run_dir)
    next_events = hub.next_batch.remote(run_id)
    while waiting:
        ready, _ = ray.wait([next_events], timeout=checkpoints.due_in())
        if not ready:
            checkpoints.write()
            continue
        for event in ray.get(next_events):
            if isinstance(event, SubPlanReady):
                parent = _agent_at(record, event.path)
                if parent.sub_run is None:  # a resumed sub-plan keeps what it had
                    parent.sub_run = _sub_run(event.path, event.query, event.plan)
                checkpoints.changed()
            if isinstance(event, _AgentDone):
                agent, result = _agent_at(record, event.path), event.result
                if agent.path not in announced and result.started_at is not None:
                    announced[agent.path] = 1
                    on_event(AgentStarted(path=agent.path, role=agent.role, attempt=1, pid=0))
                apply_result(agent, result)
                if event.path in waiting:  # a top-level agent: its sub-plans' warnings come with it
                    waiting.discard(event.path)
                    record.warnings.extend(warning for warning in result.warnings if warning not in record.warnings)
                if run_dir is not None:
                    _write_outputs(run_dir, agent)
                checkpoints.changed()
                on_event(AgentFinished(agent=agent))
                continue
            if isinstance(event, AgentStarted):
                if event.attempt <= announced.get(event.path, 0):
                    continue
                announced[event.path] = event.attempt
            elif isinstance(event, Notice) and event.warning:
                record.warnings.append(event.text)
            on_event(event)
        next_events = hub.next_batch.remote(run_id)


class _Checkpoints:
    """Writes the record when it changed, at most once every CHECKPOINT_INTERVAL_S."""

    def __init__(self, record: RunRecord, run_dir: RunDirectory | None) -> None:
        self.record, self.run_dir = record, run_dir
        self.dirty_since: float | None = None
        self.written_at = 0.0

    def changed(self) -> None:
        if self.run_dir is None:
            return
        self.dirty_since = self.dirty_since or time.monotonic()
        if time.monotonic() - self.written_at >= CHECKPOINT_INTERVAL_S:
            self.write()

    def due_in(self) -> float | None:
        """Seconds until unsaved changes must be written; None when there are none."""
        if self.dirty_since is None:
            return None
        return max(0.0, self.written_at + CHECKPOINT_INTERVAL_S - time.monotonic())

    def write(self) -> None:
        if self.run_dir is not None and self.dirty_since is not None:
            self.run_dir.write_record(self.record)
            self.written_at, self.dirty_since = time.monotonic(), None


def _agent_at(record: RunRecord, path: str) -> AgentRecord:
    agents, index = record.find(path)
    return agents[index]


def write_ray_timeline(path: Path) -> None:
    """Ray's own chrome trace (`ray.timeline`) of every task this Ray instance ran: open it in chrome://tracing or Perfetto."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ray.timeline(filename=str(path))


def _write_outputs(run_dir: RunDirectory, agent: AgentRecord) -> None:
    """One file per agent output, sub-run agents included."""
    agent.output_file = run_dir.write_agent_output(agent)
    for sub_agent in agent.sub_run.agents if agent.sub_run else []:
        _write_outputs(run_dir, sub_agent)


def _finish(record: RunRecord, run_dir: RunDirectory | None, status: str) -> None:
    record.status = status  # type: ignore[assignment]
    record.final_output = record.compose_final_output()
    record.finished_at = time.time()
    if run_dir is not None:
        run_dir.write_final(record.final_output)
        run_dir.write_record(record)
