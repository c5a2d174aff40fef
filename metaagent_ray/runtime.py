"""The only place that submits Ray tasks.

The driver submits every agent at once, in topological order, as a Ray task whose positional
arguments are the ObjectRefs of its dependencies; Ray starts each agent the moment those are
ready. There are no layer barriers and no `ray.get` between submissions: afterwards the driver
only waits (`ray.wait`) on completions and events, to report them and checkpoint the record.

Each agent is two pieces. Its *work* is a Ray task that holds an LLM slot while it calls the LLM.
Its *supervision* is a call on the run hub, an async actor that holds no slot: it bounds the work
by a deadline (cancelling a hung task), turns a crashed task into a `failed` result, and, when the
agent delegated, runs the sub-plan and waits for it. Dependents take the supervised result as their
argument, so a task never holds an LLM slot while it waits for others.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import ray._private.ray_constants as ray_constants
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .agents import BACKOFF_MAX_S, AgentContext, AgentLimits, AgentResult, run_agent
from .errors import ConfigError, MetaAgentError
from .events import (
    AgentFinished,
    AgentStarted,
    Event,
    EventHandler,
    Notice,
    PlanReady,
    RayStarting,
    RunFinished,
    SubPlanReady,
    TokenCounter,
    TokensArrived,
)
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
from .resources import SLOT_RESOURCE, SlotPlan, default_slots

WARM_WORKERS = 16  # idle Ray workers kept alive when no slot count says how many agents run at once
PLACEMENT_TIMEOUT_S = 30.0
RAY_TASK_RETRIES = 3  # re-executions when a worker process dies mid-agent
DEADLINE_GRACE_S = 5.0
LOOPBACK = "127.0.0.1"

_embedded = False  # whether ensure_ray started Ray in this process, which then stops it (shutdown_ray)

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
class RayOptions:
    """Where to run: an existing cluster (`address`) or embedded local Ray, and the LLM slot cap."""

    address: str | None = None
    slots: int | None = None
    verbose: bool = False
    num_gpus: int | None = None  # logical GPUs for embedded Ray (tests); None lets Ray detect them


@dataclass(frozen=True)
class RunLimits:
    """Bounds on one run: per agent (tries, time, tokens, failure policy, depth) and for the whole tree."""

    agent: AgentLimits = field(default_factory=AgentLimits)
    max_total_agents: int = 200

    def deadline(self) -> float | None:
        """How long one agent's task may run before it is cancelled: every try, and the backoff between."""
        call = self.agent.call_timeout
        if call is None:
            return None
        return call * (self.agent.retries + 1) + BACKOFF_MAX_S * self.agent.retries + DEADLINE_GRACE_S


def ensure_ray(options: RayOptions, llm: LLMConfig | None = None) -> SlotPlan | None:
    """Connect to the cluster at `address`, or start Ray embedded with LLM slots for this machine.

    Embedded Ray gets as many LLM slots as the machine's RAM, cores and the model allow, and at
    least `slots` (the plan is returned so the caller can show its reasoning). A run's own cap is
    `slots`, reserved per run, so later runs in this process may ask for more.
    """
    if ray.is_initialized():
        return None
    common: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.INFO if options.verbose else logging.ERROR,
        "log_to_driver": options.verbose,
    }
    plan = None
    try:
        if options.address:
            ray.init(address=options.address, **common)
            return None
        if llm is not None:
            plan = default_slots(llm)
        node_slots = max(options.slots or 0, plan.slots if plan else 0) or None
        resources = {SLOT_RESOURCE: float(node_slots)} if node_slots else {}
        # Ray keeps only as many idle workers as CPUs and kills the rest within a second; agents
        # are I/O-bound and a worker may hold a loaded model, so keep as many as may run at once.
        warm = max(node_slots or WARM_WORKERS, os.cpu_count() or 1)
        _loopback_only()
        ray.init(
            address="local",  # a new instance of our own, even when another Ray runs on this machine
            _node_ip_address=LOOPBACK,
            resources=resources,
            num_gpus=options.num_gpus,
            _system_config={"num_workers_soft_limit": warm},
            **common,
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {options.address}" if options.address else "a local Ray instance"
        raise ConfigError(f"cannot start or reach {where}: {error}") from None
    global _embedded
    _embedded = True
    return plan


def _loopback_only() -> None:
    """Make the Ray about to start listen on loopback only, unreachable from the network.

    On Linux Ray treats every machine as a would-be cluster node: it advertises the machine's network
    address and its servers listen on every interface. What Ray does on laptops (macOS, Windows) is
    what an embedded run wants, and Ray reads that switch from its constants in this process and from
    the environment in the processes it starts (GCS, raylet, dashboard agent, workers).
    """
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def shutdown_ray() -> None:
    """Stop the Ray this process started (its GCS, raylet and workers); a cluster it joined keeps running.

    Stop signals are ignored meanwhile, so a second Ctrl-C cannot leave Ray's processes behind.
    """
    global _embedded
    if _embedded:
        with stop_signals_ignored():
            ray.shutdown()
        _embedded = False


@dataclass(frozen=True)
class _Submission:
    """What it takes to submit agents the way the driver did: shared by a run and its sub-plans."""

    run_id: str
    llm: LLMConfig
    limits: RunLimits
    task_options: dict[str, Any]
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

    `kept` holds what a resume keeps: an `ok` result goes straight to the agent's dependents
    without running it; a `delegated` one continues its sub-plan without a new LLM call.
    """
    kept = kept or {}
    layer_of = plan.layer_of()
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
        dependency_refs = [refs[dep] for dep in spec.depends_on]
        if earlier is not None:
            work = ray.put(earlier)
        else:
            work = _agent_task.options(**submission.task_options).remote(
                context, dependency_specs, hub, submission.run_id, submission.stream, *dependency_refs
            )
        # Refs inside a list are passed as refs, not awaited: the hub supervises the work as it runs.
        refs[agent_id] = hub.supervise.remote(submission, context, dependency_specs, [work, *dependency_refs])
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
class _SubAgentDone:
    """Hub to driver: an agent of a sub-plan has its final result (the driver records it)."""

    path: str
    result: AgentResult


@ray.remote(num_cpus=0)
def _agent_task(
    context: AgentContext, dependency_specs: dict[int, AgentSpec], hub: Any, run_id: str, stream: bool, *inputs: AgentResult
) -> AgentResult:
    """One agent's work on a Ray worker. Ray passes the dependencies' results in place of their ObjectRefs.

    With `stream`, the answer's tokens go to the hub as they arrive (a few events a second, not awaited).
    """
    node = ray.get_runtime_context().get_node_id()
    execution = hub.started.remote(run_id, context.label, context.spec.role.value, os.getpid(), node)  # not awaited
    on_text = TokenCounter(context.label, lambda event: hub.progress.remote(run_id, event)) if stream else None
    result = run_agent(context, inputs, dependency_specs, on_text)
    result.node = node
    result.attempts += ray.get(execution) - 1  # each earlier execution died mid-agent: one try each
    return result


@ray.remote(num_cpus=0, max_concurrency=100_000)
class _RunHub:
    """Per driver: supervises agents (deadline, crashes, delegation) and streams events to drivers.

    Async, so thousands of supervisions wait concurrently in one process without holding any slot.
    """

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Queue[Event | _SubAgentDone | None]] = {}  # None ends a run's stream
        self._executions: dict[tuple[str, str], int] = {}
        self._started: dict[tuple[str, str], asyncio.Event] = {}
        self._started_at: dict[tuple[str, str], float] = {}
        self._work: dict[str, list[ray.ObjectRef]] = {}
        self._total: dict[str, int] = {}

    def _queue(self, run_id: str) -> asyncio.Queue[Event | _SubAgentDone | None]:
        return self._events.setdefault(run_id, asyncio.Queue())

    def _publish(self, run_id: str, event: Event | _SubAgentDone) -> None:
        self._queue(run_id).put_nowait(event)

    def _start_signal(self, run_id: str, path: str) -> asyncio.Event:
        return self._started.setdefault((run_id, path), asyncio.Event())

    async def open_run(self, run_id: str, agents: int) -> None:
        self._total[run_id] = agents
        self._work[run_id] = []

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

    async def next_batch(self, run_id: str) -> list[Event | _SubAgentDone]:
        queue = self._queue(run_id)
        events = [await queue.get()]
        while not queue.empty():
            events.append(queue.get_nowait())
        return [event for event in events if event is not None]

    async def cancel(self, run_id: str) -> None:
        """Stop every agent task of the run (Ctrl-C)."""
        for work in self._work.get(run_id, []):
            ray.cancel(work, force=True)

    async def forget(self, run_id: str) -> None:
        """The run is over: release its waiting `next_batch` and everything kept for it."""
        self._queue(run_id).put_nowait(None)
        self._events.pop(run_id)
        self._work.pop(run_id, None)
        self._total.pop(run_id, None)
        for table in (self._executions, self._started, self._started_at):
            for key in [key for key in table if key[0] == run_id]:
                del table[key]

    async def supervise(
        self, submission: _Submission, context: AgentContext, dependency_specs: dict[int, AgentSpec], refs: list[ray.ObjectRef]
    ) -> AgentResult:
        """The agent's final result: its work's, bounded in time, or its sub-plan's when it delegated."""
        work, *dependency_refs = refs
        self._work.setdefault(submission.run_id, []).append(work)
        result = await self._await_work(submission, context, work)
        if result.status == "delegated" and result.sub_plan is not None:
            result = await self._delegate(submission, context, dependency_specs, dependency_refs, result)
        if "." in context.label:  # the driver sees top-level results itself
            self._publish(submission.run_id, _SubAgentDone(context.label, result))
        return result

    async def _await_work(self, submission: _Submission, context: AgentContext, work: ray.ObjectRef) -> AgentResult:
        """Wait for the work; once it has started, give it `deadline` seconds before cancelling it."""
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
            ray.cancel(work, force=True)
            return self._failure(submission.run_id, context, f"timed out: no result within {deadline:g} s (--agent-timeout); the task was cancelled")
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
            work = _agent_task.options(**submission.task_options).remote(
                alone, dependency_specs, me, run_id, submission.stream, *dependency_refs
            )
            self._work[run_id].append(work)
            result = await self._await_work(submission, alone, work)
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
    job = ray.get_runtime_context().get_job_id()
    if job not in _hubs:
        _hubs[job] = _RunHub.remote()
    return _hubs[job]


def _slot_group(slots: int) -> PlacementGroup:
    """Reserve `slots` LLM slots for this run, so at most that many agents call an LLM at once."""
    available = ray.cluster_resources().get(SLOT_RESOURCE, 0)
    if available < slots:
        raise ConfigError(
            f"--slots {slots}: the Ray cluster has only {int(available)} {SLOT_RESOURCE} resources "
            f"(start its nodes with --resources '{{\"{SLOT_RESOURCE}\": N}}')"
        )
    group = placement_group([{SLOT_RESOURCE: 1.0}] * slots, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(group)
        raise ConfigError(f"--slots {slots}: the cluster could not reserve {slots} free LLM slots within {PLACEMENT_TIMEOUT_S:.0f} s")
    return group


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
    ray_was_up, ray_started_at = ray.is_initialized(), time.time()
    if not ray_was_up:
        on_event(RayStarting(address=ray_options.address))
    slot_plan = ensure_ray(ray_options, llm)
    ray_ready_at = time.time()
    if slot_plan is not None and ray_options.slots is None:
        on_event(Notice(f"🧮 {slot_plan.slots} LLM slots on this machine ({slot_plan.reasons[-1]}; see `metaagent resources`)"))
    record = RunRecord.start(
        plan,
        query,
        llm={"backend": llm.backend, "model": llm.model},
        settings=settings or {},
        slots=ray_options.slots or int(ray.cluster_resources().get(SLOT_RESOURCE, 0)) or None,
        run_dir=str(run_dir.path) if run_dir else None,
        coordinator=coordinator,
        ray_started_at=None if ray_was_up else ray_started_at,
        ray_ready_at=None if ray_was_up else ray_ready_at,
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

    task_options: dict[str, Any] = {"num_cpus": 0, "max_retries": RAY_TASK_RETRIES}
    group = _slot_group(ray_options.slots) if ray_options.slots else None
    if group is not None:
        task_options["resources"] = {SLOT_RESOURCE: 1.0}
        task_options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group=group)
    elif ray.cluster_resources().get(SLOT_RESOURCE, 0) > 0:
        task_options["resources"] = {SLOT_RESOURCE: 1.0}
    hub = _run_hub()
    submission = _Submission(run_id=uuid.uuid4().hex, llm=llm, limits=limits, task_options=task_options, stream=stream)
    saved = f" in {run_dir.path}; resume with: metaagent resume {run_dir.path}" if run_dir else ""
    try:
        with stop_signals_interrupt():
            ray.get(hub.open_run.remote(submission.run_id, len(plan.agents)))
            refs = submit_plan(plan, query, submission, hub, kept=kept)
            _follow(record, refs, hub, submission.run_id, run_dir, on_event)
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
        if group is not None:
            remove_placement_group(group)
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


def _follow(
    record: RunRecord, refs: dict[int, ray.ObjectRef], hub: Any, run_id: str, run_dir: RunDirectory | None, on_event: EventHandler
) -> None:
    """Report events and completions as they happen, checkpointing the record after each completion."""
    pending = {ref: agent_id for agent_id, ref in refs.items() if not record.agents[agent_id].reused}
    announced: dict[str, int] = {}  # agent path -> the latest execution whose start was reported
    next_events = hub.next_batch.remote(run_id)
    while pending:
        ready, _ = ray.wait([next_events, *pending], num_returns=1)
        if ready[0] == next_events:
            for event in ray.get(next_events):
                if isinstance(event, SubPlanReady):
                    parent = _agent_at(record, event.path)
                    if parent.sub_run is None:  # a resumed sub-plan keeps what it had
                        parent.sub_run = _sub_run(event.path, event.query, event.plan)
                    _checkpoint(record, run_dir)
                if isinstance(event, _SubAgentDone):
                    agent = _agent_at(record, event.path)
                    apply_result(agent, event.result)
                    _agent_finished(record, agent, run_dir, on_event)
                    continue
                if isinstance(event, AgentStarted):
                    if event.attempt <= announced.get(event.path, 0):
                        continue
                    announced[event.path] = event.attempt
                elif isinstance(event, Notice) and event.warning:
                    record.warnings.append(event.text)
                on_event(event)
            next_events = hub.next_batch.remote(run_id)
            continue
        agent = record.agents[pending.pop(ready[0])]
        try:
            result: AgentResult = ray.get(ready[0])
        except ray.exceptions.RayTaskError as error:  # a fault in one supervision fails its agent, not the run
            agent.status, agent.error = "failed", f"the agent's supervision failed: {type(error.cause).__name__}"
        else:
            if agent.path not in announced and result.started_at is not None:
                announced[agent.path] = 1
                on_event(AgentStarted(path=agent.path, role=agent.role, attempt=1, pid=0))
            apply_result(agent, result)
            record.warnings.extend(warning for warning in result.warnings if warning not in record.warnings)
        _agent_finished(record, agent, run_dir, on_event)


def _agent_at(record: RunRecord, path: str) -> AgentRecord:
    agents, index = record.find(path)
    return agents[index]


def _agent_finished(record: RunRecord, agent: AgentRecord, run_dir: RunDirectory | None, on_event: EventHandler) -> None:
    """Keep a finished agent on disk at once (its output file and the record), then report it."""
    if run_dir is not None:
        _write_outputs(run_dir, agent)
    _checkpoint(record, run_dir)
    on_event(AgentFinished(agent=agent))


def _checkpoint(record: RunRecord, run_dir: RunDirectory | None) -> None:
    if run_dir is not None:
        run_dir.write_record(record)


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
