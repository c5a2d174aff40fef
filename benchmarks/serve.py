"""Many runs, one model server: which run's ready agent gets the next free LLM slot (`metaagent serve`).

An open-loop arrival of runs (Poisson), each a random DAG of 4 to 60 agents (benchmarks/scale.py's
generator, 2 to 12 layers), every agent's LLM call taking 0.5 to 2 s (seeded), on 8 slots. 400 runs
by default: a load is what the slots see once arrivals have kept them busy a while, and the first
few dozen runs find them empty whatever the order (`--runs 40` measures that start, a short burst).
The same arrivals and durations go through:

- `independent`: today's `metaagent run` per request: every run has its own 8 slots (its own
  `SlotPool`, longest remaining path first), all on one model server that serves 8 calls at a time
  and queues the rest first come, first served (what Ollama or llama.cpp with 8 parallel slots do);
- each policy of the pool `metaagent serve` shares among its runs (`fifo`, `path`, `las`,
  `las-path`, `short`): one `SlotPool` of 8 slots, so the server never holds more than 8 calls;
- `oracle`: what no real scheduler can do, a bound for the orders above: it knows every call's
  duration beforehand and gives the next slot to the run with the fewest seconds of calls left
  (shortest remaining processing time), within it the longest remaining path in seconds.

The agents wait on the real `SlotPool` (metaagent_ray/executors.py, the object the hub uses) under
asyncio, each call an `asyncio.sleep` of its duration, on an event loop whose clock jumps to its
next timer whenever nothing is ready (virtual time: exact, the same on every machine, and 400
runs, over half an hour of arrivals, take about a second per order; nothing is sampled from
wall-clock time on a busy machine).
Reported in the calls' seconds: mean and p95 run completion time (finish minus arrival), the worst
slowdown (completion over the run's makespan alone on the 8 slots, longest path first: 1.0 is no
wait at all), and slot utilisation (the calls' seconds over 8 x the time from the first arrival to
the last finish). With several seeds or loads, a last table sums each order up over each load's
workloads: its mean over FIFO's on average, and on how many workloads it reaches 0.7 x FIFO's mean
and keeps its worst slowdown within FIFO's. How much any order can gain depends on the load: with
little queueing there is little to reorder.

Run:  python benchmarks/serve.py [--runs 400] [--slots 8] [--load 0.9 [1.0 ...]] [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import selectors
import statistics
from dataclasses import dataclass
from typing import Callable

from scale import random_dag
from slots import list_schedule

from metaagent_ray import parse_plan
from metaagent_ray.executors import POLICIES, SlotPool
from metaagent_ray.plan import ExecutionPlan


@dataclass
class Run:
    name: str
    plan: ExecutionPlan
    durations: dict[int, float]  # agent -> its call's seconds
    arrival: float  # seconds after the first run's

    @property
    def work(self) -> float:
        return sum(self.durations.values())


def workload(runs: int, slots: int, load: float, seed: int) -> list[Run]:
    """`runs` random DAGs arriving as a Poisson process whose rate keeps the slots `load` busy on average."""
    generator = random.Random(seed)
    made = []
    for number in range(runs):
        size = generator.randint(4, 60)
        plan = parse_plan(random_dag(size, seed * 1000 + number, depth=generator.randint(2, min(size, 12))), max_agents=size)
        durations = {agent: generator.uniform(0.5, 2.0) for agent in range(size)}
        made.append(Run(f"run{number}", plan, durations, 0.0))
    rate = load * slots / statistics.mean(run.work for run in made)  # runs per second
    clock = 0.0
    for run in made:
        run.arrival = clock
        clock += generator.expovariate(rate)
    return made


class JumpingSelector(selectors.SelectSelector):
    """Waiting for the next timer takes no time: the loop's clock jumps there."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list:
        if timeout:
            self.now += timeout
        return super().select(0)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.selector = JumpingSelector()
        super().__init__(self.selector)

    def time(self) -> float:
        return self.selector.now


def simulate(runs: list[Run], slots: int, policy: str) -> dict[str, float]:
    """Every run through the pool (or, `independent`, each through its own pool and a first-come server), in
    virtual time; returns run -> completion time in seconds."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(_simulate(runs, slots, policy, loop.time))
    finally:
        loop.close()


class OracleSlots:
    """Slots handed to the waiting agent whose run has the fewest seconds of calls left (known beforehand)."""

    def __init__(self, slots: int) -> None:
        self.free = slots
        self.left: dict[str, float] = {}  # run -> seconds of its calls not yet started
        self.waiting: list[tuple[str, float, int, asyncio.Future[None]]] = []  # run, remaining path (s), arrival, future
        self.arrivals = itertools.count()

    async def acquire(self, run: str, path_s: float, duration: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((run, path_s, next(self.arrivals), future))
        self._dispatch()
        await future
        self.left[run] -= duration

    def release(self) -> None:
        self.free += 1
        self._dispatch()

    def _dispatch(self) -> None:
        while self.free and self.waiting:
            first = min(self.waiting, key=lambda waiter: (self.left[waiter[0]], -waiter[1], waiter[2]))
            self.waiting.remove(first)
            self.free -= 1
            first[3].set_result(None)


async def _simulate(runs: list[Run], slots: int, policy: str, clock: Callable[[], float]) -> dict[str, float]:
    if policy == "oracle":
        return await _simulate_oracle(runs, slots, clock)
    shared = SlotPool({0: slots}, policy, clock) if policy != "independent" else None  # type: ignore[arg-type]
    server = asyncio.Semaphore(slots)  # the model server: `slots` calls at once, the rest queue in arrival order
    finished: dict[str, float] = {}

    async def one_run(run: Run) -> None:
        await asyncio.sleep(run.arrival)
        pool = shared if shared is not None else SlotPool({0: slots}, "path", clock)
        priority = run.plan.remaining_path()
        pool.add_work(run.name, len(run.durations), max(priority.values()))
        done: dict[int, asyncio.Future[None]] = {agent: asyncio.get_running_loop().create_future() for agent in run.durations}

        async def agent(index: int) -> None:
            await asyncio.gather(*(done[dep] for dep in run.plan.agents[index].depends_on))
            slot = await pool.acquire(priority[index], run.name)
            async with server:
                await asyncio.sleep(run.durations[index])
            pool.release(slot, run.name)
            done[index].set_result(None)

        await asyncio.gather(*(agent(index) for index in run.durations))
        finished[run.name] = clock() - run.arrival

    await asyncio.gather(*(one_run(run) for run in runs))
    return finished


async def _simulate_oracle(runs: list[Run], slots: int, clock: Callable[[], float]) -> dict[str, float]:
    oracle = OracleSlots(slots)
    finished: dict[str, float] = {}

    async def one_run(run: Run) -> None:
        await asyncio.sleep(run.arrival)
        oracle.left[run.name] = run.work
        path_s = run.plan.remaining_path(run.durations)
        done: dict[int, asyncio.Future[None]] = {agent: asyncio.get_running_loop().create_future() for agent in run.durations}

        async def agent(index: int) -> None:
            await asyncio.gather(*(done[dep] for dep in run.plan.agents[index].depends_on))
            await oracle.acquire(run.name, path_s[index], run.durations[index])
            await asyncio.sleep(run.durations[index])
            oracle.release()
            done[index].set_result(None)

        await asyncio.gather(*(agent(index) for index in run.durations))
        finished[run.name] = clock() - run.arrival

    await asyncio.gather(*(one_run(run) for run in runs))
    return finished


@dataclass
class Figures:
    """One order's figures on one workload."""

    mean: float
    p95: float
    worst_slowdown: float  # a run's completion time over its makespan alone on the slots, at worst
    utilisation: float


def figures(runs: list[Run], completion: dict[str, float], slots: int) -> Figures:
    alone = {run.name: list_schedule(run.plan, run.durations, slots) for run in runs}
    times = sorted(completion.values())
    span = max(run.arrival + completion[run.name] for run in runs) - min(run.arrival for run in runs)
    return Figures(
        mean=statistics.mean(times),
        p95=times[min(len(times) - 1, int(0.95 * len(times)))],
        worst_slowdown=max(completion[run.name] / alone[run.name] for run in runs),
        utilisation=sum(run.work for run in runs) / (slots * span),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=400, help="runs arriving, one workload")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--load", type=float, nargs="+", default=[0.9], help="the slots' average busy share the arrival rate aims at; several: one sweep each")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one workload each")
    args = parser.parse_args()
    orders = ("independent", *POLICIES, "oracle")
    # (load, order) -> per workload: mean / FIFO's, worst slowdown <= FIFO's worst
    against_fifo: dict[tuple[float, str], list[tuple[float, bool]]] = {(load, order): [] for load in args.load for order in orders}
    for load in args.load:
        for seed in args.seeds:
            runs = workload(args.runs, args.slots, load, seed)
            sizes = [len(run.plan.agents) for run in runs]
            print(f"\nseed {seed}: {len(runs)} runs of {min(sizes)}-{max(sizes)} agents ({sum(sizes)} in all), {args.slots} slots, load {load}")
            print("\n| order | mean completion (s) | mean / FIFO's | p95 completion (s) | worst slowdown | slot utilisation |")
            print("|---|---:|---:|---:|---:|---:|")
            each = {order: figures(runs, simulate(runs, args.slots, order), args.slots) for order in orders}
            fifo = each["fifo"]
            for order, got in each.items():
                against_fifo[load, order].append((got.mean / fifo.mean, got.worst_slowdown <= fifo.worst_slowdown))
                print(f"| {order} | {got.mean:.1f} | {got.mean / fifo.mean:.2f} | {got.p95:.1f} | {got.worst_slowdown:.1f} | {got.utilisation:.0%} |", flush=True)
    if len(args.seeds) > 1 or len(args.load) > 1:
        count = len(args.seeds)
        print(f"\nOver the {count} workloads of each load:\n")
        print("| load | order | mean / FIFO's, average | workloads with mean <= 0.7 x FIFO's | workloads with worst slowdown <= FIFO's worst |")
        print("|---:|---|---:|---:|---:|")
        for (load, order), results in against_fifo.items():
            ratios = [ratio for ratio, _ in results]
            within = sum(round(ratio, 2) <= 0.7 for ratio in ratios)
            print(f"| {load} | {order} | {statistics.mean(ratios):.2f} | {within}/{count} | {sum(fair for _, fair in results)}/{count} |")


if __name__ == "__main__":
    main()
