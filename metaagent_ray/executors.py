"""Where agents execute: one executor actor per node, whose threads make that node's LLM calls.

An agent calling an LLM waits on a socket or a model server: it should cost a thread, not a
process. A plain Ray task per agent needs a worker process per agent in flight (about 70 MB and a
second of start-up each), so hundreds of agents in flight do not fit on a laptop. Instead each node
with LLM slots gets, per run, one threaded actor that reserves the node's share of the run's slots
(the Ray custom resource `llm_slot`, so Ray's accounting stays exact) and runs that many agents at
once, each in one of the actor's threads. An agent's call carries its dependencies' results, which
Ray resolved for the hub's `supervise` task (hub.py).

A process that started its own Ray keeps a finished run's executors for its next run
(`release_executors`), so warm runs do not wait for Ray to start an actor's process.

The `SlotPool` hands the executors' threads out: an agent whose inputs are ready waits for a free
slot on any node, and when several wait, the policy says who goes first (a queue of futures: no
polling). A run's own pool orders by longest remaining path; the pool `metaagent serve` shares
among its runs orders by attained service and path together (docs/serve.md).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .agents import AgentContext, run_agent
from .errors import ConfigError
from .events import TokenCounter
from .record import AgentRecord
from .resources import MAX_SLOTS, SLOT_RESOURCE
from .tracing import continued

EXECUTOR_START_TIMEOUT_S = 30.0
EXECUTOR_STOP_TIMEOUT_S = 2.0
UNCAPPED_CONCURRENCY = MAX_SLOTS  # agents at once on a cluster whose nodes state no LLM slots


@ray.remote(num_cpus=0, max_restarts=-1)
class AgentExecutor:
    """Runs agents in its threads (`max_concurrency` = its slots); restarted by Ray if its process dies."""

    def process(self) -> tuple[str, int]:
        """Its node and process id, once it is up (again, after Ray restarted it)."""
        return ray.get_runtime_context().get_node_id(), os.getpid()

    def run(self, context: AgentContext, stream_to: ActorHandle | None, run_id: str, *inputs: AgentRecord) -> AgentRecord:
        """One agent's work, on a thread the hub's slot pool reserved for it, so it starts on arrival.

        With a hub to `stream_to`, the answer's tokens go there as they arrive (a few events a second, not
        awaited); without one none is sent (an actor handle costs more to send than the rest of the call).
        """
        on_text = TokenCounter(context.path, lambda event: stream_to.post.remote(run_id, event)) if stream_to is not None else None
        with continued(context.trace, context.llm):  # its LLM calls as spans under the agent's, when the run is traced
            result = run_agent(context, inputs, on_text)
        result.node = ray.get_runtime_context().get_node_id()
        return result


@dataclass
class Executor:
    """One executor of a run: its actor, its node and how many agents it runs at once."""

    actor: ActorHandle[AgentExecutor]
    node: str
    slots: int


def start_executors(slots: int | None) -> list[Executor]:
    """One executor per node with LLM slots, together holding `slots` of them (all when None).

    `slots` is split over the nodes in proportion to their `llm_slot`; each executor reserves its
    share, so concurrent runs on one cluster never exceed the cluster's slots. Returns at once:
    the executors start while the caller does other work (the coordinator plans); `wait_started`
    waits for them. Executors an earlier run of this process kept (`release_executors`) are taken
    when they hold the same share.
    """
    kept = _kept.pop(ray.get_runtime_context().get_job_id(), None)
    if kept is not None:
        if kept[0] == slots:
            return kept[1]
        stop_executors(kept[1])  # another share: their slots go back first
    nodes = {node["NodeID"]: int(node["Resources"].get(SLOT_RESOURCE, 0)) for node in ray.nodes() if node["Alive"]}
    nodes = {node: count for node, count in nodes.items() if count > 0}
    if not nodes:  # a cluster that states no slots: one executor here, capped by --slots
        here = ray.get_runtime_context().get_node_id()
        return _launched([(here, slots or UNCAPPED_CONCURRENCY, False)])
    total = sum(nodes.values())
    wanted = slots or total
    if wanted > total:
        raise ConfigError(
            f"--slots {wanted}: the Ray cluster has only {total} {SLOT_RESOURCE} resources "
            f"(start its nodes with --resources '{{\"{SLOT_RESOURCE}\": N}}')"
        )
    shares = split(wanted, nodes)
    return _launched([(node, share, True) for node, share in shares.items() if share > 0])


def split(wanted: int, capacity: dict[str, int]) -> dict[str, int]:
    """`wanted` slots over nodes in proportion to their capacity (largest remainder), none over capacity."""
    total = sum(capacity.values())
    exact = {node: wanted * count / total for node, count in capacity.items()}
    shares = {node: int(value) for node, value in exact.items()}
    for node in sorted(exact, key=lambda node: exact[node] - shares[node], reverse=True)[: wanted - sum(shares.values())]:
        shares[node] += 1
    return shares


def _launched(plan: list[tuple[str, int, bool]]) -> list[Executor]:
    """Create the executors; each reserves its slots (`reserve`) once Ray places it."""
    return [
        Executor(
            AgentExecutor.options(
                max_concurrency=count,
                resources={SLOT_RESOURCE: float(count)} if reserve else {},
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote(),
            node,
            count,
        )
        for node, count, reserve in plan
    ]


def wait_started(executors: list[Executor]) -> None:
    """Wait until each executor holds its slots (bounded: another run may hold them); ConfigError if they do not."""
    ready, _ = ray.wait(
        [executor.actor.process.remote() for executor in executors], num_returns=len(executors), timeout=EXECUTOR_START_TIMEOUT_S
    )
    if len(ready) < len(executors):
        stop_executors(executors)
        wanted = sum(executor.slots for executor in executors)
        raise ConfigError(
            f"--slots {wanted}: the cluster could not reserve {wanted} free LLM slots within {EXECUTOR_START_TIMEOUT_S:.0f} s"
        )


def stop_executors(executors: list[Executor]) -> None:
    """End the run's executors and give their slots back to Ray at once.

    Each is first asked to exit (so its last task events reach Ray's timeline), then killed: a
    call abandoned past its deadline would otherwise keep the process, and the slots, busy.
    """
    ends = [executor.actor.__ray_terminate__.remote() for executor in executors]
    ray.wait(ends, num_returns=len(ends), timeout=EXECUTOR_STOP_TIMEOUT_S)
    for executor in executors:
        ray.kill(executor.actor, no_restart=True)


def release_executors(executors: list[Executor], slots: int | None, *, keep: bool) -> None:
    """After a run: with `keep`, leave the executors started for this process's next run (a Ray it
    started is its own, so their slots wait for nobody else), else stop them."""
    if keep:
        _kept[ray.get_runtime_context().get_job_id()] = (slots, executors)
    else:
        stop_executors(executors)


def stop_kept_executors() -> None:
    """Stop the executors kept for a next run (before this process stops its Ray)."""
    for _, executors in _kept.values():
        stop_executors(executors)
    _kept.clear()


_kept: dict[str, tuple[int | None, list[Executor]]] = {}  # Ray job id -> a finished run's executors and the slots they hold


class NoSlotsLeft(Exception):
    """Every executor of the run is gone with its node: no agent of the run can run any more."""


# The order in which agents waiting for a slot get one: `fifo` by arrival; `path` longest remaining path first
# (one run's order since the start); `las` the run with the least attained service (slot-seconds so far) first,
# as Autellix does; `las-path` by attained service in steps of LAS_STEP_S, and within a step longest path first;
# `short` the run with the fewest agents left first (its graph says how many), aged by its slowdown so far (its
# wait over what it would take alone on the slots: SLOWDOWN_STEP of it halves its count, two steps a third,
# and so on), and within a run longest path first.
Policy = Literal["fifo", "path", "las", "las-path", "short"]
POLICIES: tuple[Policy, ...] = ("fifo", "path", "las", "las-path", "short")
LAS_STEP_S = 4.0  # slot-seconds: runs whose attained service differs by less than this are near-ties for `las-path`
SLOWDOWN_STEP = 0.25  # for `short`: a run that has waited this share of its time alone counts half its agents left


@dataclass
class _Waiter:
    run: str
    priority: float
    order: int
    future: asyncio.Future[int]


@dataclass
class _SlotSeconds:
    """Calls granted a slot, and the slot-seconds they held, exact at any time without knowing which call is
    which: (sum of end times) + (calls in flight) x now - (sum of grant times)."""

    granted: int = 0
    ended: int = 0
    granted_at: float = 0.0  # the sum of their grant times
    ended_at: float = 0.0  # the sum of their end times

    def grant(self, now: float) -> None:
        self.granted += 1
        self.granted_at += now

    def end(self, now: float) -> None:
        self.ended += 1
        self.ended_at += now

    def total(self, now: float) -> float:
        return self.ended_at + (self.granted - self.ended) * now - self.granted_at


@dataclass
class _Service:
    """One run's calls and work, while it holds or waits for slots."""

    arrived: float
    held: _SlotSeconds = field(default_factory=_SlotSeconds)  # its attained service
    left: int = 0  # agents submitted whose call has not ended
    agents: int = 0  # agents submitted
    path: float = 0.0  # the longest chain of agents among its plans

    def aged_left(self, now: float, slots: int, call_s: float | None) -> float:
        """Its agents left, divided by 1 + its slowdown so far in SLOWDOWN_STEPs; its slowdown is its age over
        its time alone on `slots` slots (its longest chain, or its agents spread over the slots, whichever is
        longer) in calls of `call_s` seconds. No ageing while no call has ended (`call_s` None)."""
        alone_s = max(self.path, self.agents / slots) * (call_s or 0.0)
        if alone_s <= 0:
            return self.left
        return self.left / (1 + (now - self.arrived) / alone_s / SLOWDOWN_STEP)


class SlotPool:
    """LLM slots on executors, handed out to the agents of one run or of many (`serve`) in the order of `policy`.

    `acquire` waits (on a future, never polling) until an executor has a free thread; `release`
    gives it back and wakes the waiter the policy puts first. An executor whose node died is
    dropped, and its slots with it; once none is left, acquiring raises NoSlotsLeft. Every run's
    agents wait in the one queue, so the cap over all of them is the executors' threads, exactly.
    """

    def __init__(self, slots: dict[int, int], policy: Policy = "path", clock: Callable[[], float] = time.monotonic) -> None:
        self._free = dict(slots)  # executor index -> free slots
        self._slots = dict(slots)  # executor index -> its slots, while it is in the pool
        # run -> its waiters, a heap in the run's own order (arrival for fifo and las, else longest path first): the
        # policy compares runs by their first waiters only, so a dispatch costs O(runs), not O(agents waiting)
        self._waiting: dict[str, list[tuple[tuple[float, ...], _Waiter]]] = {}
        self._order = itertools.count()
        self._policy, self._clock = policy, clock
        self._service: dict[str, _Service] = {}  # run -> its calls and work, while it holds or waits for slots
        self._calls = _SlotSeconds()  # every call the pool granted, ended runs' too: what a call takes on average

    def for_run(self, run: str) -> RunSlots:
        """The pool as one run sees it."""
        return RunSlots(self, run)

    async def acquire(self, priority: float, run: str = "") -> int:
        """An executor index with a slot now held for the caller; NoSlotsLeft once every executor is gone."""
        if not self._free:
            raise NoSlotsLeft()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(run, priority, next(self._order), future)
        within = (waiter.order,) if self._policy in ("fifo", "las") else (-priority, waiter.order)
        heapq.heappush(self._waiting.setdefault(run, []), (within, waiter))
        self._of(run)
        self._dispatch()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result(), run)
            raise

    def add_work(self, run: str, agents: int, path: float) -> None:
        """The run has `agents` more to run (its plan, a sub-plan), whose longest chain is `path` agents: what
        `short` orders by."""
        service = self._of(run)
        service.left += agents
        service.agents += agents
        service.path = max(service.path, path)

    def release(self, index: int, run: str = "") -> None:
        service = self._service.get(run)
        now = self._clock()
        if service is not None:  # else the run is over (a call it abandoned ends late)
            service.held.end(now)
            service.left -= 1
        self._calls.end(now)
        if index in self._free:
            self._free[index] += 1
            self._dispatch()

    def forget(self, run: str) -> None:
        """The run is over: its attained service no longer counts (a later run may reuse nothing of it)."""
        self._service.pop(run, None)

    def _of(self, run: str) -> _Service:
        if run not in self._service:
            self._service[run] = _Service(arrived=self._clock())
        return self._service[run]

    def attained(self, run: str) -> float:
        """The run's slot-seconds so far, its calls in flight included."""
        service = self._service.get(run)
        return 0.0 if service is None else service.held.total(self._clock())

    def drop(self, index: int) -> bool:
        """The executor is gone for good (its node died): no agent is sent there again. Whether it was
        still in the pool; once none is, every waiter gets NoSlotsLeft."""
        if self._free.pop(index, None) is None:
            return False
        self._slots.pop(index, None)
        if not self._free:
            for waiters in self._waiting.values():
                for _, waiter in waiters:
                    if not waiter.future.done():
                        waiter.future.set_exception(NoSlotsLeft())
            self._waiting.clear()
        return True

    @property
    def executors(self) -> int:
        return len(self._free)

    def _key(self, now: float, first: dict[str, _Waiter]) -> Callable[[str], tuple[float, ...]]:
        """The policy's order of runs by their first waiters, smallest first; arrival breaks ties."""
        if self._policy == "fifo":
            return lambda run: (first[run].order,)
        if self._policy == "path":
            return lambda run: (-first[run].priority, first[run].order)
        if self._policy == "short":
            slots, calls = sum(self._slots.values()), self._calls
            call_s = calls.total(now) / calls.granted if calls.ended else None  # the calls in flight counted up to now
            return lambda run: (self._of(run).aged_left(now, slots, call_s), -first[run].priority, first[run].order)
        if self._policy == "las":
            return lambda run: (self._of(run).held.total(now), first[run].order)
        return lambda run: (self._of(run).held.total(now) // LAS_STEP_S, -first[run].priority, first[run].order)

    def _first_waiters(self) -> dict[str, _Waiter]:
        """Each run's first waiter still waiting (one cancelled meanwhile is dropped)."""
        first = {}
        for run, waiters in list(self._waiting.items()):
            while waiters and waiters[0][1].future.done():
                heapq.heappop(waiters)
            if waiters:
                first[run] = waiters[0][1]
            else:
                del self._waiting[run]
        return first

    def _dispatch(self) -> None:
        now = self._clock()
        while True:
            index = max(self._free, key=lambda key: self._free[key], default=None)
            if index is None or self._free[index] == 0:
                return
            first = self._first_waiters()
            if not first:
                return
            run = min(first, key=self._key(now, first))
            _, waiter = heapq.heappop(self._waiting[run])
            self._free[index] -= 1
            self._of(run).held.grant(now)
            self._calls.grant(now)
            waiter.future.set_result(index)


@dataclass(frozen=True)
class RunSlots:
    """One run's side of a slot pool: what it acquires and releases counts as its service."""

    pool: SlotPool
    run: str

    async def acquire(self, priority: float) -> int:
        return await self.pool.acquire(priority, self.run)

    def add_work(self, agents: int, path: float) -> None:
        self.pool.add_work(self.run, agents, path)

    def release(self, index: int) -> None:
        self.pool.release(index, self.run)

    def drop(self, index: int) -> bool:
        return self.pool.drop(index)

    @property
    def executors(self) -> int:
        return self.pool.executors
