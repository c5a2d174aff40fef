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
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .agents import BACKOFF_MAX_S, AgentContext, AgentLimits, AgentResult, run_agent
from .errors import ConfigError, MetaAgentError
from .events import AgentFinished, AgentStarted, Event, EventHandler, Notice, PlanReady, RunFinished
from .llm import LLMConfig
from .plan import AgentSpec, ExecutionPlan
from .record import AgentRecord, CoordinatorRecord, RunDirectory, RunRecord, SubRunRecord, agent_records, compose_final_output
from .resources import SLOT_RESOURCE, SlotPlan, default_slots

WARM_WORKERS = 16  # idle Ray workers kept alive when no slot count says how many agents run at once
PLACEMENT_TIMEOUT_S = 30.0
RAY_TASK_RETRIES = 3  # re-executions when a worker process dies mid-agent
DEADLINE_GRACE_S = 5.0

log = logging.getLogger(__name__)


class RunInterrupted(MetaAgentError):
    """The user stopped the run; what finished is saved in `record`."""

    exit_code = 130

    def __init__(self, message: str, record: RunRecord) -> None:
        super().__init__(message)
        self.record = record


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
        ray.init(
            address="local",  # a new instance of our own, even when another Ray runs on this machine
            resources=resources,
            num_gpus=options.num_gpus,
            _system_config={"num_workers_soft_limit": warm},
            **common,
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {options.address}" if options.address else "a local Ray instance"
        raise ConfigError(f"cannot start or reach {where}: {error}") from None
    return plan


def announce_slots(slot_plan: SlotPlan | None, ray_options: RayOptions, on_event: EventHandler) -> None:
    """Say how many LLM slots the Ray this process just started has, unless the run set its own."""
    if slot_plan is not None and ray_options.slots is None:
        on_event(Notice(f"🧮 {slot_plan.slots} LLM slots on this machine ({slot_plan.reasons[-1]}; see `metaagent resources`)"))


@dataclass(frozen=True)
class _Submission:
    """What it takes to submit agents the way the driver did: shared by a run and its sub-plans."""

    run_id: str
    llm: LLMConfig
    limits: RunLimits
    task_options: dict[str, Any]


def submit_plan(
    plan: ExecutionPlan,
    query: str,
    submission: _Submission,
    hub: Any,
    *,
    prefix: str = "",
    reused: dict[int, AgentResult] | None = None,
) -> dict[int, ray.ObjectRef]:
    """Submit every agent of `plan` (no waiting); returns each agent's supervised result.

    Agents in `reused` are not run: their earlier results go straight to their dependents.
    """
    reused = reused or {}
    layer_of = plan.layer_of()
    refs: dict[int, ray.ObjectRef] = {}
    for agent_id in plan.topological_order():
        if agent_id in reused:
            refs[agent_id] = ray.put(reused[agent_id])
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
        )
        dependency_specs = {dep: plan.agents[dep] for dep in spec.depends_on}
        dependency_refs = [refs[dep] for dep in spec.depends_on]
        work = _agent_task.options(**submission.task_options).remote(context, dependency_specs, hub, submission.run_id, *dependency_refs)
        # Refs inside a list are passed as refs, not awaited: the hub supervises the work as it runs.
        refs[agent_id] = hub.supervise.remote(submission, context, dependency_specs, [work, *dependency_refs])
    return refs


@ray.remote(num_cpus=0)
def _agent_task(
    context: AgentContext, dependency_specs: dict[int, AgentSpec], hub: Any, run_id: str, *inputs: AgentResult
) -> AgentResult:
    """One agent's work on a Ray worker. Ray passes the dependencies' results in place of their ObjectRefs."""
    execution = hub.started.remote(run_id, context.label, context.spec.role.value, os.getpid())  # not awaited
    result = run_agent(context, inputs, dependency_specs)
    result.node = ray.get_runtime_context().get_node_id()
    result.attempts += ray.get(execution) - 1  # each earlier execution died mid-agent: one try each
    return result


@ray.remote(num_cpus=0, max_concurrency=100_000)
class _RunHub:
    """Per driver: supervises agents (deadline, crashes, delegation) and streams events to drivers.

    Async, so thousands of supervisions wait concurrently in one process without holding any slot.
    """

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Queue[Event | None]] = {}  # None ends a run's stream
        self._executions: dict[tuple[str, str], int] = {}
        self._started: dict[tuple[str, str], asyncio.Event] = {}
        self._work: dict[str, list[ray.ObjectRef]] = {}
        self._total: dict[str, int] = {}

    def _queue(self, run_id: str) -> asyncio.Queue[Event | None]:
        return self._events.setdefault(run_id, asyncio.Queue())

    def _publish(self, run_id: str, event: Event) -> None:
        self._queue(run_id).put_nowait(event)

    def _start_signal(self, run_id: str, path: str) -> asyncio.Event:
        return self._started.setdefault((run_id, path), asyncio.Event())

    async def open_run(self, run_id: str, agents: int) -> None:
        self._total[run_id] = agents
        self._work[run_id] = []

    async def started(self, run_id: str, path: str, role: str, pid: int) -> int:
        """An agent's work began (again, if Ray retried it); returns which execution this is."""
        execution = self._executions.get((run_id, path), 0) + 1
        self._executions[(run_id, path)] = execution
        self._start_signal(run_id, path).set()
        self._publish(run_id, AgentStarted(path=path, role=role, attempt=execution, pid=pid))
        return execution

    async def next_batch(self, run_id: str) -> list[Event]:
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
        for table in (self._executions, self._started):
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
            self._publish(submission.run_id, AgentFinished(agent=to_record(result, context)))
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
            return _failure(context, f"timed out: no result within {deadline:g} s (--agent-timeout); the task was cancelled")
        except ray.exceptions.RayError as error:
            detail = next(iter(str(error).splitlines()), "")
            return _failure(context, f"the agent's Ray task failed: {type(error).__name__}" + (f": {detail}" if detail else ""))

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
            work = _agent_task.options(**submission.task_options).remote(alone, dependency_specs, me, run_id, *dependency_refs)
            self._work[run_id].append(work)
            result = await self._await_work(submission, alone, work)
            result.warnings = [*parent.warnings, warning]
            return result
        self._total[run_id] = self._total.get(run_id, 0) + len(plan.agents)
        layers = plan.get_execution_layers()
        self._publish(run_id, Notice(f"🔀 Agent {context.label} delegated its task to {len(plan.agents)} agents in {len(layers)} layers"))
        sub_refs = submit_plan(plan, parent.sub_query, submission, me, prefix=f"{context.label}.")
        sub_results = list(await asyncio.gather(*(asyncio.wrap_future(sub_refs[index].future()) for index in range(len(plan.agents)))))
        records = agent_records(plan, prefix=f"{context.label}.")
        for record, result in zip(records, sub_results):
            apply_result(record, result)
        sinks_ok = all(sub_results[index].status == "ok" for index in plan.sinks())
        parent.status = "ok" if sinks_ok else "failed"
        parent.error = None if sinks_ok else "its sub-plan's final agent did not succeed"
        parent.output = compose_final_output(plan, records)
        parent.sub_results = sub_results
        parent.warnings = [*parent.warnings, *plan.warnings]
        parent.finished_at = time.time()
        return parent


def _failure(context: AgentContext, error: str) -> AgentResult:
    return AgentResult(agent_id=context.agent_id, role=context.spec.role.value, status="failed", error=error, attempts=1)


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


def to_record(result: AgentResult, context: AgentContext) -> AgentRecord:
    """The public record of an agent's result (with its sub-run, recursively)."""
    spec = context.spec
    record = AgentRecord(
        id=context.agent_id, path=context.label, role=spec.role.value, task=spec.task, depends_on=spec.depends_on, layer=context.layer
    )
    apply_result(record, result)
    return record


def apply_result(agent: AgentRecord, result: AgentResult) -> None:
    """Copy what the agent's task measured into its record."""
    agent.status = result.status  # type: ignore[assignment]
    agent.output, agent.error = result.output, result.error
    agent.started_at, agent.finished_at = result.started_at, result.finished_at
    agent.inputs_from = result.inputs_from
    agent.node, agent.attempts, agent.llm_ms, agent.reused = result.node, result.attempts, result.llm_ms, result.reused
    if result.prompt_tokens is not None or result.completion_tokens is not None:
        agent.tokens = {"prompt": result.prompt_tokens or 0, "completion": result.completion_tokens or 0}
    if result.sub_plan is not None and result.sub_results:
        plan = result.sub_plan
        agents = agent_records(plan, prefix=f"{agent.path}.")
        for sub_record, sub_result in zip(agents, result.sub_results):
            apply_result(sub_record, sub_result)
        agent.sub_run = SubRunRecord(
            query=result.sub_query, plan=plan, layers=plan.get_execution_layers(), warnings=plan.warnings, agents=agents
        )


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
    reused: dict[int, AgentRecord] | None = None,
) -> RunRecord:
    """Run every agent of `plan` on Ray and return the record; checkpoints `run_dir` as agents finish.

    Agents in `reused` (from the run being resumed) keep their records and are not run again.
    """
    announce_slots(ensure_ray(ray_options, llm), ray_options, on_event)
    record = RunRecord.start(
        plan,
        query,
        llm={"backend": llm.backend, "model": llm.model},
        settings=settings or {},
        slots=ray_options.slots or int(ray.cluster_resources().get(SLOT_RESOURCE, 0)) or None,
        run_dir=str(run_dir.path) if run_dir else None,
        coordinator=coordinator,
    )
    reused = reused or {}
    for agent_id, earlier in reused.items():
        record.agents[agent_id] = earlier.model_copy(update={"reused": True})
    if run_dir is not None:
        run_dir.write_plan(plan)
        run_dir.write_record(record)
    on_event(PlanReady(plan=plan, layers=record.layers, run_dir=record.run_dir))

    task_options: dict[str, Any] = {"num_cpus": 0, "max_retries": RAY_TASK_RETRIES}
    group = _slot_group(ray_options.slots) if ray_options.slots else None
    if group is not None:
        task_options["resources"] = {SLOT_RESOURCE: 1.0}
        task_options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group=group)
    elif ray.cluster_resources().get(SLOT_RESOURCE, 0) > 0:
        task_options["resources"] = {SLOT_RESOURCE: 1.0}
    hub = _run_hub()
    submission = _Submission(run_id=uuid.uuid4().hex, llm=llm, limits=limits, task_options=task_options)
    ray.get(hub.open_run.remote(submission.run_id, len(plan.agents)))
    refs: dict[int, ray.ObjectRef] = {}
    try:
        reused_results = {agent_id: _reused_result(earlier) for agent_id, earlier in reused.items()}
        refs = submit_plan(plan, query, submission, hub, reused=reused_results)
        _follow(record, refs, hub, submission.run_id, run_dir, on_event)
    except KeyboardInterrupt:
        ray.get(hub.cancel.remote(submission.run_id), timeout=10)
        _finish(record, run_dir, "interrupted")
        where = f" in {run_dir.path}; resume with: metaagent resume {run_dir.path}" if run_dir else ""
        raise RunInterrupted(f"interrupted; the agents that finished are saved{where}", record) from None
    finally:
        hub.forget.remote(submission.run_id)
        if group is not None:
            remove_placement_group(group)
    _finish(record, run_dir, "ok" if not record.failed_agents() else "failed")
    on_event(RunFinished(record=record))
    return record


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
        except ray.exceptions.RayError as error:
            agent.status, agent.error = "failed", f"the agent's supervision failed: {type(error).__name__}"
        else:
            if agent.path not in announced and result.started_at is not None:
                announced[agent.path] = 1
                on_event(AgentStarted(path=agent.path, role=agent.role, attempt=1, pid=0))
            apply_result(agent, result)
            record.warnings.extend(warning for warning in result.warnings if warning not in record.warnings)
        if run_dir is not None:
            _write_outputs(run_dir, agent)
            run_dir.write_record(record)
        on_event(AgentFinished(agent=agent))


def _reused_result(earlier: AgentRecord) -> AgentResult:
    """What a reused agent passes to its dependents: its earlier output, with no LLM call."""
    return AgentResult(agent_id=earlier.id, role=earlier.role, status="ok", output=earlier.output, reused=True)


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
