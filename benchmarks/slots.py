"""LLM slots: how close the makespan under 1, 2, 4 and 8 slots comes to an achievable bound.

With N slots at most N agents call an LLM at once, so no scheduler reaches the critical path on a
wide plan. The bound here is a list schedule that knows every agent's latency in advance and always
starts the ready agent with the longest remaining path first (the classic HLFET heuristic). The
runtime does not know latencies: it submits every agent at once, in topological order, and gives
each free slot to the ready agent whose remaining path is longest in agents. Latencies are
simulated by the fake LLM (seeded, unequal).

Run:  python benchmarks/slots.py [--width 12] [--repeat 1]
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from metaagent_ray import ExecutionPlan, MetaAgent, parse_plan

SLOT_COUNTS = (1, 2, 4, 8)


def wide_plan(width: int) -> ExecutionPlan:
    """`width` researchers, an analyzer for each, then a coordinator and a synthesizer."""
    agents = [{"role": "RESEARCHER", "task": f"Research topic {index}", "depends_on": []} for index in range(width)]
    agents += [{"role": "ANALYZER", "task": f"Analyze topic {index}", "depends_on": [index]} for index in range(width)]
    agents.append({"role": "COORDINATOR", "task": "Integrate the analyses", "depends_on": list(range(width, 2 * width))})
    agents.append({"role": "SYNTHESIZER", "task": "Write the report", "depends_on": [2 * width]})
    return parse_plan({"description": "wide plan", "agents": agents})


def latencies(plan: ExecutionPlan, seed: int = 7) -> dict[int, float]:
    generator = random.Random(seed)
    return {agent: round(generator.uniform(0.2, 1.2), 1) for agent in range(len(plan.agents))}


def list_schedule(plan: ExecutionPlan, durations: dict[int, float], slots: int) -> float:
    """The makespan of the longest-remaining-path-first list schedule on `slots` slots."""
    priority = plan.remaining_path(durations)  # each agent's duration plus the longest chain of durations after it
    waiting = {agent: len(spec.depends_on) for agent, spec in enumerate(plan.agents)}
    graph = plan.graph()
    ready = [(-priority[agent], agent) for agent, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    running: list[tuple[float, int]] = []
    now = 0.0
    while ready or running:
        while ready and len(running) < slots:
            _, agent = heapq.heappop(ready)
            heapq.heappush(running, (now + durations[agent], agent))
        now, done = heapq.heappop(running)
        for next_ in graph.successors(done):
            waiting[next_] -= 1
            if waiting[next_] == 0:
                heapq.heappush(ready, (-priority[next_], next_))
    return now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=12, help="researchers (and analyzers) in the wide plan")
    parser.add_argument("--repeat", type=int, default=1, help="runs per slot count; the table shows medians")
    args = parser.parse_args()
    print("$ python " + shlex.join(["benchmarks/slots.py", *sys.argv[1:]]) + "\n")

    plan = wide_plan(args.width)
    durations = latencies(plan)
    latency_file = Path(tempfile.mkdtemp()) / "latency.json"
    latency_file.write_text(json.dumps({str(agent): seconds for agent, seconds in durations.items()}))
    total = sum(durations.values())
    critical, _ = plan.critical_path(durations)
    print(f"{len(plan.agents)} agents, {total:.1f} s of LLM time, critical path {critical:.1f} s\n")

    rows = []
    for slots in SLOT_COUNTS:
        agent = MetaAgent(llm="fake", llm_options={"latency": str(latency_file)}, slots=slots)
        if slots == SLOT_COUNTS[0]:  # start Ray and as many workers as the widest cap needs
            MetaAgent(llm="fake", llm_options={"latency": 0.5}).execute(wide_plan(max(SLOT_COUNTS)), "warm-up", save=False)
        spans = [agent.execute(plan, "wide", save=False).makespan() or 0.0 for _ in range(args.repeat)]
        makespan = statistics.median(spans)
        bound = list_schedule(plan, durations, slots)
        lower = max(critical, total / slots)
        rows.append((slots, lower, bound, makespan, makespan / bound))

    print("| slots | lower bound max(critical path, work / slots) (s) | list schedule, longest path first (s) | metaagent-ray makespan (s) | makespan / list schedule |")
    print("|---:|---:|---:|---:|---:|")
    for slots, lower, bound, makespan, ratio in rows:
        print(f"| {slots} | {lower:.2f} | {bound:.2f} | {makespan:.2f} | {ratio:.3f} |")
    worst = max(row[4] for row in rows)
    print(f"\nWorst makespan / list schedule: {worst:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
