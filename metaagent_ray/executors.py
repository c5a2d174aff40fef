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

The run's `SlotPool` hands the executors' threads out: an agent whose inputs are ready waits for
a free slot on any node, and when several wait, the one with the longest remaining path goes first
(a priority queue of futures: no polling).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
from dataclasses import dataclass

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .agents import AgentContext, run_agent
from .errors import ConfigError
from .events import TokenCounter
from .plan import AgentSpec
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

    def run(self, context: AgentContext, dependency_specs: dict[int, AgentSpec], stream_to: ActorHandle | None, run_id: str, *inputs: AgentRecord) -> AgentRecord:
        """One agent's work, on a thread the hub's slot pool reserved for it, so it starts on arrival.

        With a hub to `stream_to`, the answer's tokens go there as they arrive (a few events a second, not
        awaited); without one none is sent (an actor handle costs more to send than the rest of the call).
        """
        on_text = TokenCounter(context.path, lambda event: stream_to.post.remote(run_id, event)) if stream_to is not None else None
        with continued(context.trace, context.llm):  # its LLM calls as spans under the agent's, when the run is traced
            result = run_agent(context, inputs, dependency_specs, on_text)
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


class SlotPool:
    """A run's LLM slots on its executors, handed out longest remaining path first.

    `acquire` waits (on a future, never polling) until an executor has a free thread; `release`
    gives it back and wakes the waiter with the highest priority. An executor whose node died is
    dropped, and its slots with it; once none is left, acquiring raises NoSlotsLeft.
    """

    def __init__(self, slots: dict[int, int]) -> None:
        self._free = dict(slots)  # executor index -> free slots
        self._waiting: list[tuple[float, int, asyncio.Future[int]]] = []
        self._order = itertools.count()

    async def acquire(self, priority: float) -> int:
        """An executor index with a slot now held for the caller; NoSlotsLeft once every executor is gone."""
        if not self._free:
            raise NoSlotsLeft()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (-priority, next(self._order), future))
        self._dispatch()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result())
            raise

    def release(self, index: int) -> None:
        if index in self._free:
            self._free[index] += 1
            self._dispatch()

    def drop(self, index: int) -> bool:
        """The executor is gone for good (its node died): no agent is sent there again. Whether it was
        still in the pool; once none is, every waiter gets NoSlotsLeft."""
        if self._free.pop(index, None) is None:
            return False
        if not self._free:
            for _, _, future in self._waiting:
                if not future.done():
                    future.set_exception(NoSlotsLeft())
            self._waiting.clear()
        return True

    @property
    def executors(self) -> int:
        return len(self._free)

    def _dispatch(self) -> None:
        while self._waiting:
            index = max(self._free, key=lambda key: self._free[key], default=None)
            if index is None or self._free[index] == 0:
                return
            _, _, future = heapq.heappop(self._waiting)
            if future.done():
                continue
            self._free[index] -= 1
            future.set_result(index)
