"""The only place that submits Ray tasks.

The driver submits every agent at once, in topological order, as a Ray task whose positional
arguments are the ObjectRefs of its dependencies; Ray starts each agent the moment those are
ready. There are no layer barriers and no `ray.get` between submissions: afterwards the driver
only waits (`ray.wait`) on completions and start events, to report them and checkpoint the record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .agents import AgentContext, AgentResult, run_agent
from .errors import ConfigError, MetaAgentError
from .events import AgentFinished, AgentStarted, EventHandler, PlanReady, RunFinished
from .llm import LLMConfig
from .plan import AgentSpec, ExecutionPlan
from .record import AgentRecord, CoordinatorRecord, RunDirectory, RunRecord

SLOT_RESOURCE = "llm_slot"
WARM_WORKERS = 16  # idle Ray workers kept alive when no slot count says how many agents run at once
PLACEMENT_TIMEOUT_S = 30.0

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


def ensure_ray(options: RayOptions) -> None:
    """Connect to the cluster at `address`, or start Ray embedded with `slots` LLM slots."""
    if ray.is_initialized():
        return
    common: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.INFO if options.verbose else logging.ERROR,
        "log_to_driver": options.verbose,
    }
    try:
        if options.address:
            ray.init(address=options.address, **common)
        else:
            resources = {SLOT_RESOURCE: float(options.slots)} if options.slots else {}
            # Ray keeps only as many idle workers as CPUs and kills the rest within a second; agents
            # are I/O-bound and a worker may hold a loaded model, so keep as many as may run at once.
            warm = max(options.slots or WARM_WORKERS, os.cpu_count() or 1)
            ray.init(resources=resources, _system_config={"num_workers_soft_limit": warm}, **common)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {options.address}" if options.address else "a local Ray instance"
        raise ConfigError(f"cannot start or reach {where}: {error}") from None


@ray.remote(num_cpus=0)
class _EventHub:
    """Collects start events from agent tasks; each run's driver awaits its next batch (no polling).

    One hub serves every run of a driver, so no run waits for an actor to start.
    """

    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue[AgentStarted | None]] = {}  # None ends a run's stream
        self._attempts: dict[tuple[str, int], int] = {}

    def _queue(self, run_id: str) -> asyncio.Queue[AgentStarted | None]:
        return self._queues.setdefault(run_id, asyncio.Queue())

    async def started(self, run_id: str, agent_id: int, role: str) -> int:
        """Count a start of this agent's task and announce it; returns the attempt number."""
        attempt = self._attempts.get((run_id, agent_id), 0) + 1
        self._attempts[(run_id, agent_id)] = attempt
        self._queue(run_id).put_nowait(AgentStarted(agent_id=agent_id, role=role, attempt=attempt))
        return attempt

    async def next_batch(self, run_id: str) -> list[AgentStarted]:
        queue = self._queue(run_id)
        events = [await queue.get()]
        while not queue.empty():
            events.append(queue.get_nowait())
        return [event for event in events if event is not None]

    async def forget(self, run_id: str) -> None:
        """The run is over: release its waiting `next_batch` and its counts."""
        self._queue(run_id).put_nowait(None)
        self._queues.pop(run_id)
        self._attempts = {key: value for key, value in self._attempts.items() if key[0] != run_id}


_hubs: dict[str, Any] = {}  # Ray job id -> its hub; holding the handle keeps the actor alive


def _event_hub() -> Any:
    """This driver's hub, created on first use."""
    job = ray.get_runtime_context().get_job_id()
    if job not in _hubs:
        _hubs[job] = _EventHub.remote()
    return _hubs[job]


@ray.remote(num_cpus=0)
def _agent_task(
    context: AgentContext, dependency_specs: dict[int, AgentSpec], hub: Any, run_id: str, *inputs: AgentResult
) -> AgentResult:
    """One agent on a Ray worker. Ray passes the dependencies' results in place of their ObjectRefs."""
    attempt = hub.started.remote(run_id, context.agent_id, context.spec.role.value)  # not awaited: the agent starts now
    result = run_agent(context, inputs, dependency_specs)
    result.node = ray.get_runtime_context().get_node_id()
    result.attempt = ray.get(attempt)
    return result


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


def execute_plan(
    plan: ExecutionPlan,
    query: str,
    llm: LLMConfig,
    *,
    ray_options: RayOptions,
    run_dir: RunDirectory | None = None,
    on_event: EventHandler,
    coordinator: CoordinatorRecord | None = None,
    max_tokens: int | None = None,
) -> RunRecord:
    """Run every agent of `plan` on Ray and return the record; checkpoints `run_dir` as agents finish."""
    ensure_ray(ray_options)
    record = RunRecord.start(plan, query, llm={"backend": llm.backend, "model": llm.model}, slots=ray_options.slots)
    record.run_dir = str(run_dir.path) if run_dir else None
    record.coordinator = coordinator
    if run_dir is not None:
        run_dir.write_plan(plan)
        run_dir.write_record(record)
    on_event(PlanReady(plan=plan, layers=record.layers, run_dir=record.run_dir))

    group = _slot_group(ray_options.slots) if ray_options.slots else None
    task_options: dict[str, Any] = {"num_cpus": 0}
    if group is not None:
        task_options["resources"] = {SLOT_RESOURCE: 1.0}
        task_options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_capture_child_tasks=True
        )
    hub, run_id = _event_hub(), uuid.uuid4().hex
    refs: dict[int, ray.ObjectRef] = {}
    try:
        for agent_id in plan.topological_order():
            spec = plan.agents[agent_id]
            context = AgentContext(agent_id=agent_id, spec=spec, query=query, llm=llm, depth=plan.depth, max_tokens=max_tokens)
            dependency_specs = {dep: plan.agents[dep] for dep in spec.depends_on}
            dependency_refs = [refs[dep] for dep in spec.depends_on]
            refs[agent_id] = _agent_task.options(**task_options).remote(context, dependency_specs, hub, run_id, *dependency_refs)
        _follow(record, refs, hub.next_batch.remote, run_id, run_dir, on_event)
    except KeyboardInterrupt:
        for ref in refs.values():
            ray.cancel(ref, force=True)
        _finish(record, run_dir, "interrupted")
        where = f" in {run_dir.path}" if run_dir else ""
        raise RunInterrupted(f"interrupted; the agents that finished are saved{where}", record) from None
    finally:
        hub.forget.remote(run_id)
        if group is not None:
            remove_placement_group(group)
    _finish(record, run_dir, "ok" if not record.failed_agents() else "failed")
    on_event(RunFinished(record=record))
    return record


def _follow(
    record: RunRecord,
    refs: dict[int, ray.ObjectRef],
    next_batch: Any,
    run_id: str,
    run_dir: RunDirectory | None,
    on_event: EventHandler,
) -> None:
    """Report starts and completions as they happen, checkpointing the record after each completion."""
    pending = {ref: agent_id for agent_id, ref in refs.items()}
    announced: dict[int, int] = {}  # agent -> the latest attempt whose start was reported
    next_events = next_batch(run_id)
    while pending:
        ready, _ = ray.wait([next_events, *pending], num_returns=1)
        if ready[0] == next_events:
            for event in ray.get(next_events):
                if event.attempt > announced.get(event.agent_id, 0):
                    announced[event.agent_id] = event.attempt
                    on_event(event)
            next_events = next_batch(run_id)
            continue
        agent = record.agents[pending.pop(ready[0])]
        try:
            result: AgentResult = ray.get(ready[0])
        except ray.exceptions.RayError as error:
            agent.status, agent.error = "failed", f"the agent's Ray task failed: {type(error).__name__}"
        else:
            if result.attempt > announced.get(agent.id, 0):
                announced[agent.id] = result.attempt
                on_event(AgentStarted(agent_id=agent.id, role=agent.role, attempt=result.attempt))
            _apply(agent, result)
        if run_dir is not None:
            agent.output_file = run_dir.write_agent_output(agent)
            run_dir.write_record(record)
        on_event(AgentFinished(agent=agent))


def _apply(agent: AgentRecord, result: AgentResult) -> None:
    agent.status = result.status
    agent.output = result.output
    agent.error = result.error
    agent.started_at, agent.finished_at = result.started_at, result.finished_at
    agent.inputs_from = result.inputs_from
    agent.node = result.node
    agent.attempts = result.attempt
    agent.llm_ms = result.llm_ms
    if result.prompt_tokens is not None or result.completion_tokens is not None:
        agent.tokens = {"prompt": result.prompt_tokens or 0, "completion": result.completion_tokens or 0}


def _finish(record: RunRecord, run_dir: RunDirectory | None, status: str) -> None:
    record.status = status  # type: ignore[assignment]
    record.final_output = record.compose_final_output()
    record.finished_at = time.time()
    if run_dir is not None:
        run_dir.write_final(record.final_output)
        run_dir.write_record(record)
