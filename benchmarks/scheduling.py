"""Scheduling benchmark: sequential vs the seed's layer-by-layer asyncio vs metaagent-ray's Ray DAG.

Each of the seed's three example workflows gets a fixed, unequal simulated latency per agent, so a
layer barrier makes fast agents wait for the slowest one of their layer. The critical path (the
longest chain of dependent latencies) is the lower bound for any scheduler; the question is how
close each executor gets to it, and what Ray adds per agent on top.

Run from anywhere:  python benchmarks/scheduling.py [--repeat N] [--scale F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from metaagent_ray import ExecutionPlan, MetaAgent, RunRecord, load_plan

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WORKFLOWS = ("parallel_research", "business_plan", "software_architecture")
WARM_UP_WORKFLOW = "software_architecture"  # the widest layer (6 agents) starts the most Ray workers
MIN_LATENCY_S, MAX_LATENCY_S = 0.3, 2.0


@dataclass
class RayRun:
    """One metaagent-ray run: its makespan, the whole execute() call, and per-agent dispatch delays."""

    makespan: float
    wall: float  # the whole execute() call
    lead_in: float  # from the call to the first agent's start: driver, event actor and worker start-up
    after_dependencies: list[float]  # started_at - max(finished_at of its dependencies)
    root_spread: list[float]  # for agents without dependencies: started_at - the earliest start


def simulated_latencies(name: str, count: int, scale: float) -> dict[int, float]:
    """Seeded by the workflow's name, so every run and every executor sees the same latencies."""
    rng = random.Random(name)
    return {agent: round(rng.uniform(MIN_LATENCY_S, MAX_LATENCY_S), 1) * scale for agent in range(count)}


def run_sequential(plan: ExecutionPlan, latencies: dict[int, float]) -> float:
    """One agent after another in topological order: the seed's pre-parallel behaviour."""
    start = time.perf_counter()
    for agent in plan.topological_order():
        time.sleep(latencies[agent])
    return time.perf_counter() - start


async def _layers_with_barriers(plan: ExecutionPlan, latencies: dict[int, float], workers: int | None) -> None:
    """The seed's `_execute_layer_parallel`: a layer's agents in the default thread pool, then await them all."""
    loop = asyncio.get_running_loop()
    if workers is not None:
        loop.set_default_executor(ThreadPoolExecutor(max_workers=workers))
    for layer in plan.get_execution_layers():
        tasks = [loop.run_in_executor(None, time.sleep, latencies[agent]) for agent in layer]
        for task in tasks:
            await task


def run_layer_by_layer(plan: ExecutionPlan, latencies: dict[int, float], workers: int | None = None) -> float:
    """Wall time of the seed's asyncio baseline, event loop included.

    The seed's default thread pool has min(32, cores + 4) threads; `workers` threads (e.g. the widest
    layer's agents) take the cap off.
    """
    start = time.perf_counter()
    asyncio.run(_layers_with_barriers(plan, latencies, workers))
    return time.perf_counter() - start


def run_ray(agent: MetaAgent, plan: ExecutionPlan) -> RayRun:
    """One metaagent-ray run; its times come from inside the Ray tasks, around the LLM call."""
    called = time.time()  # epoch seconds, comparable with the timestamps taken in the Ray workers
    record = agent.execute(plan, plan.description, save=False)
    wall = time.time() - called
    if record.status != "ok":
        raise SystemExit(f"metaagent-ray run failed: agents {record.failed_agents()}")
    makespan = record.makespan()
    assert makespan is not None
    after, roots = dispatch_delays(record)
    lead_in = min(agent.started_at for agent in record.agents if agent.started_at is not None) - called
    return RayRun(makespan=makespan, wall=wall, lead_in=lead_in, after_dependencies=after, root_spread=roots)


def dispatch_delays(record: RunRecord) -> tuple[list[float], list[float]]:
    """How long each agent waited beyond the moment it could start (its dependencies' last finish)."""
    first = min(agent.started_at for agent in record.agents if agent.started_at is not None)
    after: list[float] = []
    roots: list[float] = []
    for agent in record.agents:
        assert agent.started_at is not None
        if agent.depends_on:
            ready = max(record.agents[dep].finished_at or 0.0 for dep in agent.depends_on)
            after.append(agent.started_at - ready)
        else:
            roots.append(agent.started_at - first)
    return after, roots


def fake_llm(latencies: dict[int, float], directory: Path, name: str) -> MetaAgent:
    """A MetaAgent whose fake LLM sleeps each agent's latency (read by the Ray workers from a JSON file)."""
    path = directory / f"{name}-latency.json"
    path.write_text(json.dumps({"default": 0.0, **{str(agent): seconds for agent, seconds in latencies.items()}}))
    return MetaAgent(llm="fake", llm_options={"latency": str(path)})


def ms(seconds: list[float]) -> str:
    return f"median {statistics.median(seconds) * 1000:.0f} ms, max {max(seconds) * 1000:.0f} ms (n={len(seconds)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per workflow and executor; the table shows medians")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every simulated latency (0.3-2.0 s) by this")
    args = parser.parse_args()

    print(f"$ {shlex.join([sys.executable, *sys.argv])}\n")
    plans = {name: load_plan(EXAMPLES / f"{name}.json") for name in WORKFLOWS}
    latencies = {name: simulated_latencies(name, len(plan.agents), args.scale) for name, plan in plans.items()}
    for name in WORKFLOWS:
        shown = ", ".join(f"{agent}:{seconds:g}" for agent, seconds in latencies[name].items())
        print(f"{name} latencies (agent:s): {shown}")

    with tempfile.TemporaryDirectory() as directory:
        agents = {name: fake_llm(latencies[name], Path(directory), name) for name in WORKFLOWS}
        # Ray starts lazily: the first run pays for ray.init and worker processes. Report it, then discard it.
        cold = run_ray(agents[WARM_UP_WORKFLOW], plans[WARM_UP_WORKFLOW])
        ray_runs = {name: [run_ray(agents[name], plans[name]) for _ in range(args.repeat)] for name in WORKFLOWS}
        sequential = {name: [run_sequential(plans[name], latencies[name]) for _ in range(args.repeat)] for name in WORKFLOWS}
        layered = {name: [run_layer_by_layer(plans[name], latencies[name]) for _ in range(args.repeat)] for name in WORKFLOWS}
        # Ray kills idle worker processes beyond its CPU count within seconds; show what a wide first layer then pays.
        after_idle = run_ray(agents[WARM_UP_WORKFLOW], plans[WARM_UP_WORKFLOW])

    print(f"\nMedian of {args.repeat} run(s) per cell; Ray runs come back to back after one warm-up run.\n")
    print(
        "| workflow | agents | layers | critical path (s) | sequential (s) | layer-by-layer (s) "
        "| metaagent-ray makespan (s) | makespan / critical path | speed-up vs layer-by-layer | speed-up vs sequential |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios: list[float] = []
    for name, plan in plans.items():
        critical, _ = plan.critical_path(latencies[name])
        seq = statistics.median(sequential[name])
        layer = statistics.median(layered[name])
        makespan = statistics.median(run.makespan for run in ray_runs[name])
        ratios.extend(run.makespan / critical for run in ray_runs[name])
        print(
            f"| {name} | {len(plan.agents)} | {len(plan.get_execution_layers())} | {critical:.2f} | {seq:.2f} | {layer:.2f} "
            f"| {makespan:.2f} | {makespan / critical:.3f} | {layer / makespan:.2f}x | {seq / makespan:.2f}x |"
        )

    print()
    for name, plan in plans.items():
        _, path = plan.critical_path(latencies[name])
        wall = statistics.median(run.wall for run in ray_runs[name])
        lead_in = statistics.median(run.lead_in for run in ray_runs[name])
        print(
            f"{name}: critical path agents {path}; whole execute() call {wall:.2f} s, "
            f"of which {lead_in:.2f} s before the first agent started (medians)"
        )
    warm = [run for runs in ray_runs.values() for run in runs]
    cold_critical, _ = plans[WARM_UP_WORKFLOW].critical_path(latencies[WARM_UP_WORKFLOW])
    print(
        f"\nCold warm-up run ({WARM_UP_WORKFLOW}): makespan {cold.makespan:.2f} s = {cold.makespan / cold_critical:.3f} "
        f"x critical path; whole execute() call {cold.wall:.2f} s, of which {cold.lead_in:.2f} s (ray.init included) "
        "before the first agent started"
    )
    print(f"Warm runs, makespan / critical path: worst {max(ratios):.3f} (target <= 1.10)")
    print(
        f"Ray idle during the baselines, then {WARM_UP_WORKFLOW} again: makespan {after_idle.makespan:.2f} s = "
        f"{after_idle.makespan / cold_critical:.3f} x critical path; latest agent without dependencies started "
        f"{max(after_idle.root_spread) * 1000:.0f} ms after the first"
    )
    print(f"Per-agent dispatch delay on Ray, after the last dependency finished: {ms([d for r in warm for d in r.after_dependencies])}")
    print(f"Spread of agents without dependencies behind the first start: {ms([d for r in warm for d in r.root_spread])}")
    print(f"Cold run dispatch delay, after the last dependency finished: {ms(cold.after_dependencies)}")


if __name__ == "__main__":
    main()
