"""Hundreds to thousands of agents in flight: cold CLI runs of random DAGs under an LLM slot cap.

Each run is `metaagent exec PLAN --llm fake --fake-latency L --slots S` in a fresh process (Ray
starts inside the command, as a user meets it; L is --latency, 1 s unless given: with 0.001 the
makespan is what the runtime itself costs per agent). The plans are random DAGs with fixed seeds: about
20 layers deep, every agent after the first layer depending on 1-4 agents of the layer before.

Reported per run: makespan / max(critical path, work / slots) (no scheduler can beat 1.0) and
makespan / the longest-remaining-path-first list schedule (an achievable bound, as in
benchmarks/slots.py); p50 / p90 / max start delay (an agent's start minus its last dependency's
finish); peak summed RSS and process count of the run's process tree (sampled every 0.1 s); and
the CPU time of the driver, the run's hub and its executors.

Run:  python benchmarks/scale.py [--sizes 64 500 2000] [--slots 16 64] [--latency 1]
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from slots import list_schedule

from metaagent_ray import RunRecord, parse_plan

DEPTH = 20
SEEDS = {64: 1, 500: 2, 2000: 3}


def random_dag(size: int, seed: int, depth: int = DEPTH) -> dict:
    """`size` agents in `depth` layers; each agent after layer 0 depends on 1-4 agents of the layer before."""
    generator = random.Random(seed)
    layer_of = [index * depth // size for index in range(size)]
    by_layer: dict[int, list[int]] = {}
    for index, layer in enumerate(layer_of):
        by_layer.setdefault(layer, []).append(index)
    agents = []
    for index, layer in enumerate(layer_of):
        before = by_layer.get(layer - 1, [])
        depends_on = sorted(generator.sample(before, min(len(before), generator.randint(1, 4)))) if before else []
        agents.append({"role": "RESEARCHER" if not depends_on else "ANALYZER", "task": f"Task {index}", "depends_on": depends_on})
    return {"description": f"random DAG of {size} agents", "agents": agents}


def run_cold(plan_file: Path, size: int, slots: int, run_dir: Path, latency: str = "1") -> dict:
    """One cold CLI run, watched from outside: peak RSS and process count of its tree, the CPU time of the
    driver, the run's hub and its executors (by their process titles, last seen before they ended).

    `latency` is the fake backend's --fake-latency: seconds per agent, or a JSON file of seconds by agent index.
    """
    command = [sys.executable, "-m", "metaagent_ray", "exec", str(plan_file), "--llm", "fake", "--fake-latency", latency,
               "--slots", str(slots), "--max-agents", str(size), "--run-dir", str(run_dir), "--progress", "plain", "-q"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    driver = psutil.Process(process.pid)
    peak_rss, peak_processes, driver_cpu = 0, 0, 0.0
    actor_cpu: dict[int, tuple[str, float]] = {}  # pid -> (which actor, CPU seconds)
    while process.poll() is None:
        try:
            tree = [driver, *driver.children(recursive=True)]
            rss = 0
            for member in tree:
                try:
                    rss += member.memory_info().rss
                    title = " ".join(member.cmdline())
                    actor = next((name for name in ("RunHub", "AgentExecutor") if f"ray::{name}" in title), None)
                    if actor is not None:
                        spent = member.cpu_times()
                        actor_cpu[member.pid] = (actor, spent.user + spent.system)
                except psutil.Error:
                    pass
            peak_rss, peak_processes = max(peak_rss, rss), max(peak_processes, len(tree))
            times = driver.cpu_times()
            driver_cpu = times.user + times.system
        except psutil.Error:
            pass
        time.sleep(0.1)
    if process.returncode != 0:
        raise SystemExit(f"run failed ({process.returncode}): {process.stderr.read() if process.stderr else ''}")
    by_actor = {name: sum(cpu for actor, cpu in actor_cpu.values() if actor == name) for name in ("RunHub", "AgentExecutor")}
    return {"wall": time.perf_counter() - started, "peak_rss": peak_rss, "processes": peak_processes, "driver_cpu": driver_cpu,
            "hub_cpu": by_actor["RunHub"], "executor_cpu": by_actor["AgentExecutor"]}


def start_delays(record: RunRecord) -> list[float]:
    """Each dependent agent's start minus its last dependency's finish."""
    delays = []
    for agent in record.agents:
        if agent.depends_on and agent.started_at is not None:
            last = max(record.agents[dep].finished_at or 0.0 for dep in agent.depends_on)
            delays.append(agent.started_at - last)
    return delays


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 500, 2000])
    parser.add_argument("--slots", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per agent (0.001: what the runtime itself costs)")
    args = parser.parse_args()
    print("$ python " + shlex.join(["benchmarks/scale.py", *sys.argv[1:]]) + "\n")
    print("| agents | slots | critical path (s) | work / slots (s) | list schedule (s) | makespan (s) | makespan / max(cp, work/slots) "
          "| makespan / list schedule | start delay p50 / p90 / max (s) | peak RSS (GiB) | processes | CPU (s): driver / hub / executors | all ok |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|")
    work = Path(tempfile.mkdtemp())
    for size in args.sizes:
        data = random_dag(size, SEEDS.get(size, size))
        plan = parse_plan(data, max_agents=size)
        plan_file = work / f"dag-{size}.json"
        plan_file.write_text(json.dumps(data))
        durations = {agent: args.latency for agent in range(size)}
        critical, _ = plan.critical_path(durations)
        for slots in args.slots:
            run_dir = work / f"run-{size}-{slots}"
            watched = run_cold(plan_file, size, slots, run_dir, latency=f"{args.latency:g}")
            record = RunRecord.model_validate_json((run_dir / "record.json").read_text())
            makespan = record.makespan() or 0.0
            bound = list_schedule(plan, durations, slots)
            lower = max(critical, size * args.latency / slots)
            delays = start_delays(record)
            inputs_right = all(agent.inputs_from == agent.depends_on for agent in record.agents)
            all_ok = record.status == "ok" and inputs_right
            print(
                f"| {size} | {slots} | {critical:.0f} | {size * args.latency / slots:.1f} | {bound:.1f} | {makespan:.1f} | {makespan / lower:.2f} | "
                f"{makespan / bound:.2f} | {statistics.median(delays):.3f} / {percentile(delays, 0.9):.3f} / {max(delays):.3f} | "
                f"{watched['peak_rss'] / 2**30:.2f} | {watched['processes']} | "
                f"{watched['driver_cpu']:.1f} / {watched['hub_cpu']:.1f} / {watched['executor_cpu']:.1f} | {'yes' if all_ok else 'NO'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
