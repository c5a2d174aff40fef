"""The floor Ray sets: the project's graphs run by Ray alone, next to the project, in one session.

Where does a 500-agent run's time above its bound go: to the project, or to Ray's calls on this
machine? This runs scale.py's random DAGs (every agent `--latency` seconds, a `time.sleep` in a
thread, as the fake LLM does) with no code of the project in the Ray processes, in the two shapes a
runtime on Ray can take, and then the cheaper shape with the project's agent call in it:

- `hub shape`: what hub.py does. An async hub actor calls itself (`supervise`) with the agent's
  dependencies' refs as top-level arguments, so Ray starts it once they exist; it takes a slot from a
  priority queue (longest remaining path first) and awaits the work on a threaded executor actor
  (`max_concurrency` = the slots);
- `executor shape`: the work's own call takes the dependencies' refs as top-level arguments, straight
  to an async executor actor that holds the slot queue and runs the work in a pool of `slots` threads;
  the hub only awaits each result (as it must, to report it). One actor call per agent instead of two.
- `executor shape, agent's call`: the executor shape, each call doing what an agent of the project does
  in its executor: `run_agent` on the agent's real context (its prompt, the fake LLM's call of
  `--latency` seconds, its record) with its dependencies' records as inputs. No hub of the project, no
  events, no driver: what the project's own agent call adds to the cheapest shape.

and then the project itself, a cold `metaagent exec` (scale.py's `run_cold`). Each makespan is first
start to last finish, divided by the longest-remaining-path-first list schedule on the slots.

Run:  python benchmarks/ray_floor.py [--sizes 500 2000] [--slots 64] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Union

import ray
from scale import SEEDS, random_dag, run_cold
from slots import list_schedule

from metaagent_ray import AgentRecord, RunRecord, parse_plan
from metaagent_ray.agents import AgentContext, run_agent
from metaagent_ray.hub import plan_orders
from metaagent_ray.llm import LLMConfig
from metaagent_ray.settings import RunSettings

Timing = tuple[float, float]  # the work's start and finish
Job = Union[float, AgentContext]  # seconds of sleep, or an agent of the project to run


class Slots:
    """A priority queue of slots: the longest remaining path first, as the hub's SlotPool."""

    def __init__(self, count: int) -> None:
        self.free = count
        self.waiting: list[tuple[float, int, asyncio.Future[None]]] = []
        self.order = itertools.count()

    async def acquire(self, priority: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self.waiting, (-priority, next(self.order), future))
        self.dispatch()
        await future

    def release(self) -> None:
        self.free += 1
        self.dispatch()

    def dispatch(self) -> None:
        while self.waiting and self.free:
            self.free -= 1
            heapq.heappop(self.waiting)[2].set_result(None)


def work(latency: float) -> Timing:
    started = time.time()
    time.sleep(latency)
    return started, time.time()


@ray.remote(num_cpus=0)
class ThreadedExecutor:
    def run(self, latency: float, *inputs: Timing) -> Timing:
        return work(latency)


@ray.remote(num_cpus=0, max_concurrency=100_000)
class AsyncExecutor:
    def __init__(self, slots: int) -> None:
        self.slots = Slots(slots)
        self.threads = ThreadPoolExecutor(slots)

    async def run(self, job: Job, priority: float, *inputs: Timing | AgentRecord) -> Timing | AgentRecord:
        await self.slots.acquire(priority)
        call = partial(work, job) if isinstance(job, float) else partial(run_agent, job, inputs)
        try:
            return await asyncio.get_running_loop().run_in_executor(self.threads, call)
        finally:
            self.slots.release()


@ray.remote(num_cpus=0, max_concurrency=100_000)
class Hub:
    def __init__(self, slots: int, shape: str) -> None:
        self.me = ray.get_runtime_context().current_actor
        self.shape = shape
        self.slots = Slots(slots)
        executor = ThreadedExecutor.options(max_concurrency=slots) if shape == "hub shape" else AsyncExecutor
        self.executor = executor.remote() if shape == "hub shape" else executor.remote(slots)
        self.finished = 0  # what the hub would report to the driver

    async def supervise(self, latency: float, priority: float, *inputs: Timing) -> Timing:
        await self.slots.acquire(priority)
        try:
            timing = await self.executor.run.remote(latency, *inputs)
        finally:
            self.slots.release()
        self.finished += 1
        return timing

    async def watch(self, result: ray.ObjectRef) -> None:
        await result
        self.finished += 1

    async def run(self, depends_on: list[list[int]], priority: list[float], jobs: list[Job]) -> list[Timing]:
        results: list[ray.ObjectRef] = []
        watched = []
        for agent, dependencies in enumerate(depends_on):
            inputs = [results[dependency] for dependency in dependencies]
            if self.shape == "hub shape":
                results.append(self.me.supervise.remote(jobs[agent], priority[agent], *inputs))
            else:
                results.append(self.executor.run.remote(jobs[agent], priority[agent], *inputs))
                watched.append(self.watch(results[-1]))
        done = await asyncio.gather(*results)
        await asyncio.gather(*watched)
        return [timing if isinstance(timing, tuple) else (timing.started_at, timing.finished_at) for timing in done]


def makespan(timings: list[Timing]) -> float:
    return max(finish for _, finish in timings) - min(start for start, _ in timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--depth", type=int, default=9)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print("$ python " + shlex.join(["benchmarks/ray_floor.py", *sys.argv[1:]]) + "\n")
    work_dir = Path(tempfile.mkdtemp())
    rows = []
    for size in args.sizes:
        data = random_dag(size, SEEDS.get(size, size), depth=args.depth)
        plan = parse_plan(data, max_agents=size)
        latencies = {agent: args.latency for agent in range(size)}
        bound = list_schedule(plan, latencies, args.slots)
        priority = plan.remaining_path(latencies)
        depends_on = [list(spec.depends_on) for spec in plan.agents]
        sleeps: list[Job] = [args.latency] * size
        llm = LLMConfig(backend="fake", options={"latency": args.latency})
        agents: list[Job] = [order.context for order in plan_orders(plan, "a query", llm, RunSettings(llm="fake", max_agents=size).limits())]
        shapes = {"hub shape": ("hub shape", sleeps), "executor shape": ("executor shape", sleeps), "executor shape, agent's call": ("executor shape", agents)}
        ratios: dict[str, list[float]] = {**{name: [] for name in shapes}, "metaagent exec": []}
        ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        for _ in range(args.repeat):
            for name, (shape, jobs) in shapes.items():
                hub = Hub.remote(args.slots, shape)
                ray.get(hub.run.remote([[]], [args.latency], jobs[:1]))  # both actors up, the agent's code imported
                ratios[name].append(makespan(ray.get(hub.run.remote(depends_on, priority, jobs))) / bound)
                ray.kill(hub)
        ray.shutdown()
        plan_file = work_dir / f"dag-{size}.json"
        plan_file.write_text(json.dumps(data))
        for attempt in range(args.repeat):
            run_dir = work_dir / f"run-{size}-{attempt}"
            run_cold(plan_file, size, args.slots, run_dir, latency=str(args.latency))
            record = RunRecord.model_validate_json((run_dir / "record.json").read_text())
            ratios["metaagent exec"].append((record.makespan() or 0.0) / bound)
        rows.append((size, bound, ratios))
        print(f"  {size} agents: " + "; ".join(f"{name} {', '.join(f'{r:.3f}' for r in runs)}" for name, runs in ratios.items()), flush=True)
    print(f"\nmakespan / list schedule on {args.slots} slots (median of {args.repeat})\n")
    print("| agents | list schedule (s) | Ray alone, hub shape | Ray alone, executor shape | executor shape, agent's call | metaagent exec (cold CLI) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size, bound, ratios in rows:
        print(f"| {size} | {bound:.2f} | " + " | ".join(f"{statistics.median(runs):.3f}" for runs in ratios.values()) + " |")


if __name__ == "__main__":
    main()
