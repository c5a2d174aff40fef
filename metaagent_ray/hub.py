"""The run hub: the Ray actor that submits a run's agents, supervises them and streams their events.

Each agent is an async actor task on the hub (`supervise`) whose top-level arguments are the
ObjectRefs of its dependencies' supervised results, so Ray starts it when they exist and hands it
their values: Ray resolves the graph. Because the hub submits those calls itself, it owns every ref
of the run, and a result goes from its executor to the hub and on into its dependents' calls without
a round trip to the driver. What Ray cannot do is the hub's, and small: once an agent's inputs are
there it takes a free slot on one of the run's executors (executors.py), longest remaining path
first (Ray's queues are first come, first served), bounds the call by a deadline, runs the agent
again when its executor died and, when the agent delegated, submits the sub-plan the same way and
awaits its refs. Dependents take the supervised result, so an agent never holds an LLM slot while it
waits for others. Everything that happens is published on the run's event stream, which the driver
follows (follow.py). The driver reaches its run in the hub through a typed `RunChannel`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Union

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .agents import AgentContext, agent_deadline_s, agent_record
from .events import AgentStarted, Event, Notice, SubPlanReady
from .executors import Executor, NoSlotsLeft, Policy, RunSlots, SlotPool
from .llm import LLMConfig
from .paths import ROOT, AgentPath
from .plan import AgentSpec, ExecutionPlan
from .record import AgentRecord, FailureKind, compose_final_output, kept_agents
from .settings import Limits
from .tracing import AgentSpans, TraceParent

# The executor running an agent died (its process, and Ray restarts it) or cannot come back (its node is gone).
EXECUTOR_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError)
EXECUTOR_LOSS_RERUNS = 3  # how often the hub runs an agent again whose executor died mid-call
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submission:
    """How a run's agents are run: shared by the run and its sub-plans."""

    run_id: str
    llm: LLMConfig
    limits: Limits
    stream: bool = False  # agents stream their answers to the driver as `TokensArrived` events
    trace: TraceParent | None = None  # the run's span, when it is traced: its agents' spans are its children


@dataclass(frozen=True)
class AgentOrder:
    """One agent for the hub to run: its context and its place in the queue for slots."""

    context: AgentContext
    priority: float  # its remaining path: under a slot cap, the longest goes first
    kept: AgentRecord | None = None  # what a resume keeps of it: a `reused` one is passed on, a `delegated` one's sub-plan continues


def plan_orders(
    plan: ExecutionPlan,
    query: str,
    llm: LLMConfig,
    limits: Limits,
    *,
    parent: AgentPath = ROOT,
    kept: dict[int, AgentRecord] | None = None,
    only: set[int] | None = None,
) -> list[AgentOrder]:
    """The orders for a plan's agents (`only` those, when given), each after its dependencies; `parent` is the
    delegating agent's path for a sub-plan."""
    kept = kept or {}
    layer_of = plan.layer_of()
    remaining = plan.remaining_path()
    return [
        agent_order(
            parent.child(agent_id),
            plan.agents[agent_id],
            query=query,
            llm=llm,
            limits=limits,
            depth=plan.depth,
            layer=layer_of[agent_id],
            priority=remaining[agent_id],
            kept=kept.get(agent_id),
        )
        for agent_id in plan.topological_order()
        if only is None or agent_id in only
    ]


def agent_order(
    path: AgentPath,
    spec: AgentSpec,
    *,
    query: str,
    llm: LLMConfig,
    limits: Limits,
    depth: int,
    layer: int,
    priority: float,
    kept: AgentRecord | None = None,
) -> AgentOrder:
    """One agent's order, stamped with the time it is handed to the hub."""
    context = AgentContext(
        path=path,
        spec=spec,
        query=query,
        llm=llm,
        limits=limits,
        depth=depth,
        layer=layer,
        submitted_at=time.time(),
    )
    return AgentOrder(context, priority, kept)


@dataclass(frozen=True)
class AgentDone:
    """Hub to driver: an agent (of the plan or of a sub-plan) has its final result; the driver records it."""

    path: AgentPath
    result: AgentRecord


@dataclass(frozen=True)
class NodeLost:
    """Hub to driver: a node that ran the run's agents died; its agents in flight run again on the nodes left."""

    node: str  # its Ray node id
    address: str  # its IP address, as Ray knew it
    nodes_left: int  # nodes that still hold the run's LLM slots: with none, no agent of the run can run any more

    def describe(self) -> str:
        lost = f"Ray node {self.node} ({self.address}) was lost"
        if not self.nodes_left:
            return f"{lost}, and no other node holds LLM slots for this run"
        return f"⚠️ {lost}; its agents run again on the {self.nodes_left} node{'s' if self.nodes_left > 1 else ''} left"


@dataclass(frozen=True)
class PlanComplete:
    """Driver to driver, through its run's stream: its coordinator's thread has the plan (or failed), after every
    early agent it submitted, so the thread that follows the stream hears it in order."""


@dataclass(frozen=True)
class StopRequested:
    """Through the run's stream: someone asked the run to stop (the service's DELETE); its driver ends it as Ctrl-C does."""


StreamItem = Union[Event, AgentDone, NodeLost, PlanComplete, StopRequested]  # what a run's stream carries to its driver


@dataclass
class _HubRun:
    """What the hub keeps for one run until the driver forgets it."""

    submission: Submission
    executors: list[Executor]
    slots: RunSlots
    spans: AgentSpans  # its agents' `invoke_agent` spans (tracing.py)
    events: asyncio.Queue[StreamItem | None] = field(default_factory=asyncio.Queue)  # None ends the stream
    results: dict[AgentPath, ray.ObjectRef] = field(default_factory=dict)  # its supervised result
    orders: dict[AgentPath, AgentOrder] = field(default_factory=dict)  # until Ray starts its supervision
    work: list[ray.ObjectRef] = field(default_factory=list)
    calls: dict[AgentPath, ray.ObjectRef] = field(default_factory=dict)  # the call each agent is in now
    executions: dict[AgentPath, int] = field(default_factory=dict)  # how often it was handed to an executor
    started_at: dict[AgentPath, float] = field(default_factory=dict)
    # executor index -> its (node, pid) once it is up; forgotten when it dies, so a restart is waited for anew
    processes: dict[int, asyncio.Future[tuple[str, int]]] = field(default_factory=dict)
    total_agents: int = 0

    def publish(self, event: StreamItem) -> None:
        self.events.put_nowait(event)

    def process(self, index: int) -> asyncio.Future[tuple[str, int]]:
        """The executor's node and process, once it is up."""
        if index not in self.processes:
            self.processes[index] = asyncio.ensure_future(self.executors[index].actor.process.remote())
        return self.processes[index]


@ray.remote(num_cpus=0, max_concurrency=100_000)
class RunHub:
    """Per driver: submits and supervises agents (deadline, crashes, delegation) and streams events to drivers.

    Async, so thousands of supervisions wait concurrently in one process without holding any slot.
    """

    def __init__(self) -> None:
        self._runs: dict[str, _HubRun] = {}
        self._me = ray.get_runtime_context().current_actor
        self._shared: tuple[list[Executor], SlotPool] | None = None  # the executors and pool every run shares, once `share_slots`

    async def share_slots(self, executors: list[Executor], policy: Policy) -> None:
        """From now on runs opened without executors of their own share these, in one queue ordered by `policy`."""
        self._shared = (executors, SlotPool(_slots_of(executors), policy))

    async def shared_slots(self) -> int | None:
        """How many slots its runs share, once `share_slots`."""
        return None if self._shared is None else sum(executor.slots for executor in self._shared[0])

    async def open_run(self, submission: Submission, executors: list[Executor] | None) -> None:
        """Open a run on its own executors, or (None) on the executors `share_slots` gave."""
        if executors is None:
            assert self._shared is not None, "share_slots first"
            executors, pool = self._shared
        else:
            pool = SlotPool(_slots_of(executors))
        run = _HubRun(submission, executors, pool.for_run(submission.run_id), AgentSpans(submission.trace))
        self._runs[submission.run_id] = run

    async def submit(self, run_id: str, orders: list[AgentOrder]) -> None:
        """Start supervising these agents (each order after its dependencies' orders)."""
        self._submit(self._runs[run_id], orders)

    def _submit(self, run: _HubRun, orders: list[AgentOrder]) -> None:
        run.total_agents += len(orders)
        to_run = [order for order in orders if order.kept is None]  # the calls still to make, for the `short` order
        run.slots.add_work(len(to_run), max((order.priority for order in to_run), default=0.0))
        for order in orders:
            path = order.context.path
            if order.kept is not None and order.kept.reused:
                run.results[path] = ray.put(order.kept)
                continue
            # Top-level ObjectRefs: Ray starts `supervise` once every dependency's result exists, and passes the results.
            # The order stays here: the call carries only its name.
            run.orders[path] = order
            run.results[path] = self._me.supervise.remote(run.submission.run_id, path, *_inputs_of(run, order))

    async def post(self, run_id: str, event: Event | PlanComplete | StopRequested) -> None:
        """An event from outside the hub (streamed tokens, the driver's own), in order with the hub's own."""
        run = self._runs.get(run_id)
        if run is not None:  # dropped once the run is over
            run.publish(event)

    async def next_batch(self, run_id: str) -> list[StreamItem]:
        """The run's events since the last batch, waiting for one; none once the run is over."""
        run = self._runs.get(run_id)
        if run is None:
            return []
        queue = run.events
        events = [await queue.get()]
        while not queue.empty():
            events.append(queue.get_nowait())
        return [event for event in events if event is not None]

    async def cancel(self, run_id: str) -> None:
        """Stop every agent of the run (Ctrl-C, a plan set aside); the driver then ends the executors, and any call in them."""
        run = self._runs.get(run_id)
        if run is None:
            return
        for ref in [*run.results.values(), *run.work]:
            ray.cancel(ref)

    async def forget(self, run_id: str) -> None:
        """The run is over: release its waiting `next_batch` and everything kept for it."""
        run = self._runs.pop(run_id, None)
        if run is not None:
            run.slots.pool.forget(run_id)
            run.events.put_nowait(None)
            run.spans.close()
            await asyncio.to_thread(run.spans.flush)

    async def supervise(self, run_id: str, path: AgentPath, *inputs: AgentRecord) -> AgentRecord:
        """The agent's final result: its work's, or its sub-plan's when it delegated. Ray calls it with its
        dependencies' results once they all exist (`inputs`, unread here: its executor gets the same refs).

        Whatever happens, the driver hears of it: a fault here fails this agent, never hangs the run.
        """
        run = self._runs[run_id]
        order = run.orders.pop(path)
        order = replace(order, context=replace(order.context, trace=run.spans.start(path, order.context.spec)))
        try:
            if order.kept is not None:  # a resumed agent continues its unfinished sub-plan
                result = order.kept
            else:
                result = await self._execute(run, order)
            if result.status == "delegated" and result.sub_run is not None:
                result = await self._delegate(run, order, result)
        except Exception as error:  # noqa: BLE001 - reported as the agent's error
            log.exception("supervising agent %s failed", path)
            result = _failure(run, order.context, FailureKind.SUPERVISION, f"the agent's supervision failed: {type(error).__name__}: {error}")
        for warning in result.warnings:  # the one way warnings reach the driver: as events
            run.publish(Notice(warning, warning=True))
        result.warnings = []
        run.publish(AgentDone(path, result))
        run.spans.end(path, result)
        return result

    async def _execute(self, run: _HubRun, order: AgentOrder) -> AgentRecord:
        """Run the agent on an executor with a free slot; an execution lost with its executor is tried again."""
        context, slots = order.context, run.slots
        while True:
            try:
                index = await slots.acquire(order.priority)
            except NoSlotsLeft:
                return _failure(run, context, FailureKind.NO_NODE, "no node with LLM slots for this run is left")
            try:
                result, work = await self._run_on(run, order, index)
            except asyncio.CancelledError:  # the run is cancelled: its slot comes back once its call really ends,
                work = run.calls.get(context.path)  # so the cap over runs sharing the pool stays exact
                if work is None:
                    slots.release(index)
                else:
                    asyncio.ensure_future(_release_when_done(work, slots, index))
                raise
            except EXECUTOR_LOST as error:
                run.processes.pop(index, None)  # Ray restarts it: its new process is waited for
                run.spans.event(context.path, "executor_lost", error=type(error).__name__)
                slots.release(index)
                if isinstance(error, ray.exceptions.ActorUnschedulableError) or not _node_alive(run.executors[index].node):
                    _lose_node(run, index)
                executions = run.executions.get(context.path, 1)
                if executions > EXECUTOR_LOSS_RERUNS:
                    return _failure(run, context, FailureKind.EXECUTOR_LOST, f"the agent's executor died {executions} times: {type(error).__name__}")
                continue
            finally:
                run.calls.pop(context.path, None)
            if result.failure is FailureKind.TIMED_OUT:
                asyncio.ensure_future(_release_when_done(work, slots, index))  # the call still holds its thread
            else:
                slots.release(index)
            return result

    async def _run_on(self, run: _HubRun, order: AgentOrder, index: int) -> tuple[AgentRecord, ray.ObjectRef]:
        """One execution on executor `index`, whose slot the caller holds: a free thread of a process that is up,
        so the agent starts as its call arrives, and the hub says so itself (no call back from the executor)."""
        context, submission = order.context, run.submission
        node, pid = await run.process(index)
        stream_to = self._me if submission.stream else None
        # The inputs go on as the refs they came from: Ray copies their bytes, the hub pickles nothing of them again.
        work = run.executors[index].actor.run.remote(context, stream_to, submission.run_id, *_inputs_of(run, order))
        run.work.append(work)
        run.calls[context.path] = work
        execution = run.executions.get(context.path, 0) + 1
        run.executions[context.path] = execution
        run.started_at.setdefault(context.path, time.time())
        run.publish(AgentStarted(path=context.path, role=context.spec.role.value, attempt=execution, pid=pid, node=node))
        return await self._await_work(run, context, work), work

    async def _await_work(self, run: _HubRun, context: AgentContext, work: ray.ObjectRef) -> AgentRecord:
        """Wait for the work, at most `deadline` seconds from its start."""
        deadline = agent_deadline_s(run.submission.limits)
        try:
            result = await (work if deadline is None else asyncio.wait_for(work, timeout=deadline))
        except asyncio.TimeoutError:
            ray.cancel(work)
            return _failure(run, context, FailureKind.TIMED_OUT, f"timed out: no result within {deadline:g} s (--agent-timeout); the agent was abandoned")
        except EXECUTOR_LOST:
            raise
        except ray.exceptions.RayError as error:
            detail = next(iter(str(error).splitlines()), "")
            return _failure(run, context, FailureKind.RAY, f"the agent's Ray task failed: {type(error).__name__}" + (f": {detail}" if detail else ""))
        result.attempts += run.executions[context.path] - 1  # each earlier execution died with its executor: one try each
        return result

    async def _delegate(self, run: _HubRun, order: AgentOrder, parent: AgentRecord) -> AgentRecord:
        """Run the agent's sub-plan as agents like any other; its final output becomes the agent's.

        The sub-plan's agents that already finished (a resumed run) are kept as they are.
        """
        sub_run, context, submission = parent.sub_run, order.context, run.submission
        assert sub_run is not None
        plan, limit = sub_run.plan, submission.limits.max_total_agents
        if run.total_agents + len(plan.agents) > limit:
            warning = f"⚠️ Agent {context.path}: not delegating to {len(plan.agents)} more agents, the run would exceed --max-total-agents {limit}; it answers itself"
            run.publish(Notice(warning, warning=True))
            alone = replace(order, context=replace(context, delegation_allowed=False))
            result = await self._execute(run, alone)
            result.warnings = [*parent.warnings, *result.warnings]  # the fallback of its sub-plan, if it had one
            return result
        run.publish(SubPlanReady(path=context.path, query=sub_run.query, plan=plan, layers=sub_run.layers))
        kept = kept_agents(plan, sub_run.agents)
        self._submit(run, plan_orders(plan, sub_run.query, submission.llm, submission.limits, parent=context.path, kept=kept))
        sub_run.agents = list(await asyncio.gather(*(run.results[context.path.child(index)] for index in range(len(plan.agents)))))
        sinks_ok = all(sub_run.agents[index].status == "ok" for index in plan.sinks())
        parent.status = "ok" if sinks_ok else "failed"
        parent.error = None if sinks_ok else "its sub-plan's final agent did not succeed"
        parent.failure = None if sinks_ok else FailureKind.SUB_PLAN
        parent.output = compose_final_output(plan, sub_run.agents)
        parent.warnings = [*parent.warnings, *plan.warnings]
        parent.finished_at = time.time()
        return parent


def _failure(run: _HubRun, context: AgentContext, kind: FailureKind, error: str) -> AgentRecord:
    """A work task that never returned: each execution Ray made counts as a try."""
    return agent_record(
        context,
        status="failed",
        error=error,
        failure=kind,
        attempts=max(1, run.executions.get(context.path, 0)),
        started_at=run.started_at.get(context.path),
        finished_at=time.time(),
    )


# (the driver's node, its Ray job) -> its hub; holding the handle keeps the actor alive. The node's id
# tells Ray instances apart: one process may stop its Ray and start another, whose first job has the same id.
_hubs: dict[tuple[str, str], ActorHandle[RunHub]] = {}


# The hub whose slots `metaagent serve` shares, by name: other drivers' runs on the cluster find it and share them too.
SERVED_HUB, SERVED_NAMESPACE = "metaagent-serve-hub", "metaagent"


def run_hub(*, served: bool = False) -> ActorHandle[RunHub]:
    """This driver's hub, created on first use; `served` names it (SERVED_HUB), for a service's first call."""
    context = ray.get_runtime_context()
    key = (context.get_node_id(), context.get_job_id())
    if key not in _hubs:
        # On the driver's node: losing another node must not lose the run's supervision.
        here = NodeAffinitySchedulingStrategy(node_id=key[0], soft=False)
        named = {"name": SERVED_HUB, "namespace": SERVED_NAMESPACE} if served else {}
        _hubs[key] = RunHub.options(scheduling_strategy=here, **named).remote()
    return _hubs[key]


def served_hub() -> tuple[ActorHandle[RunHub], int] | None:
    """The hub of a `metaagent serve` on this cluster and the slots it shares, if one runs."""
    try:
        hub = ray.get_actor(SERVED_HUB, namespace=SERVED_NAMESPACE)
    except ValueError:
        return None
    slots = ray.get(hub.shared_slots.remote())
    return None if slots is None else (hub, slots)


class RunChannel:
    """The driver's side of one run in its hub: typed calls on the hub actor, as `ray.util.queue.Queue` is on its own.

    `submit` and `open` are waited for, so a fault in them ends the run instead of leaving it waiting;
    `post` is not (tokens, the driver's own markers). `cancel` is bounded: a hub that is gone or slow
    cannot keep a stop from finishing.
    """

    CANCEL_TIMEOUT_S = 10.0

    def __init__(self, submission: Submission, executors: list[Executor] | None, hub: ActorHandle[RunHub] | None = None) -> None:
        """On `executors` of its own, or (None) on those the hub shares among runs (`RunHub.share_slots`); in this
        driver's hub, or in `hub` (a service's)."""
        self.run_id = submission.run_id
        self._traced = submission.trace is not None
        self._hub = hub or run_hub()
        ray.get(self._hub.open_run.remote(submission, executors))

    def submit(self, orders: list[AgentOrder]) -> None:
        ray.get(self._hub.submit.remote(self.run_id, orders))

    def post(self, event: Event | PlanComplete | StopRequested) -> None:
        """An event of the driver's into the run's stream, in order with the hub's."""
        self._hub.post.remote(self.run_id, event)

    def next_batch(self) -> ray.ObjectRef[list[StreamItem]]:
        """The run's next events, when there are some: an ObjectRef of a list, to `ray.wait` on."""
        return self._hub.next_batch.remote(self.run_id)

    def cancel(self) -> None:
        """Stop every agent of the run."""
        try:
            ray.get(self._hub.cancel.remote(self.run_id), timeout=self.CANCEL_TIMEOUT_S)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            log.debug("cancelling the run's agents failed", exc_info=True)

    def forget(self) -> None:
        """The run is over: the hub lets go of it. Waited for (bounded) only when the run is traced: the hub sends
        its spans then, before the driver may stop Ray."""
        forgotten = self._hub.forget.remote(self.run_id)
        if self._traced:
            try:
                ray.get(forgotten, timeout=self.CANCEL_TIMEOUT_S)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                log.debug("the hub did not send the run's spans", exc_info=True)


async def _release_when_done(work: ray.ObjectRef, slots: RunSlots, index: int) -> None:
    """Give back an abandoned agent's slot once its call really ends, so the cap stays exact."""
    await asyncio.wait([asyncio.ensure_future(work)])
    slots.release(index)


def _inputs_of(run: _HubRun, order: AgentOrder) -> list[ray.ObjectRef]:
    """The refs of the agent's dependencies' supervised results, in the order of its `depends_on`."""
    path = order.context.path
    return [run.results[path.parent.child(dep)] for dep in order.context.spec.depends_on]


def _slots_of(executors: list[Executor]) -> dict[int, int]:
    return {index: executor.slots for index, executor in enumerate(executors)}


def _node_alive(node: str) -> bool:
    return any(entry["NodeID"] == node and entry["Alive"] for entry in ray.nodes())


def _lose_node(run: _HubRun, index: int) -> None:
    """The executor's node died: its slots leave the run, and the driver hears it once per node."""
    if run.slots.drop(index):
        node = run.executors[index].node
        address = next((entry["NodeManagerAddress"] for entry in ray.nodes() if entry["NodeID"] == node), "address unknown")
        run.publish(NodeLost(node, address, run.slots.executors))
