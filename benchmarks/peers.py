"""Peers: the same plans and latencies run by LangGraph, CrewAI, the seed's layered asyncio and metaagent-ray.

Every runner gets the same plans and the same simulated LLM latency per agent, in one session:

- asyncio, the seed's layer-by-layer executor (benchmarks/scheduling.py), one thread per agent of
  the widest layer (no cap);
- LangGraph: a StateGraph with one async node per agent (`asyncio.sleep` of its latency) and a fan-in
  edge from its dependencies (`add_edge([deps], node)` waits for all of them), `ainvoke` without a cap
  and with `max_concurrency` = --slots;
- CrewAI: one Agent and Task per agent, `context` = its dependencies' tasks, a custom `BaseLLM` that
  sleeps the agent's latency and answers a fixed string (no network). CrewAI runs `async_execution`
  tasks in threads and a synchronous task waits for every one before it; an async task may not take
  an async task's output unless a synchronous task lies between them. So each layer's agents run
  async but one (its shortest agent, the cheapest barrier), which runs synchronously after them;
- metaagent-ray as a user meets it: a cold `metaagent exec PLAN --llm fake --fake-latency ...` per run
  (benchmarks/scale.py's `run_cold`), with --slots S and with --slots = the plan's agents (no cap);
  its makespan is the run record's.

Makespan: first agent start to last agent finish, taken inside each agent (the peers) or from the
record (metaagent-ray); the asyncio row is the executor's wall time. Bound: the longest-remaining-path-first
list schedule on --slots slots for a capped runner (benchmarks/slots.py), the critical path otherwise.
A second table gives each whole call: `ainvoke`, `kickoff` (CrewAI's set-up included), or the CLI
process (Ray's start included); building the graph or the crew is outside both.
Plans: the example plans (seeded latencies 0.3-2.0 s, as in scheduling.py) and random DAGs of --sizes
agents in --depth layers (scale.py's generator), every agent --latency seconds.

Run:  pip install -e ".[bench]" && python benchmarks/peers.py [--sizes 500 2000] [--latency 1] [--repeat 1]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypedDict

from scale import SEEDS, random_dag, run_cold
from scheduling import EXAMPLES, WORKFLOWS, run_layer_by_layer, simulated_latencies
from slots import list_schedule

from metaagent_ray import ExecutionPlan, RunRecord, load_plan, parse_plan

ANSWER = "done"  # what every simulated LLM call answers
CREWAI_TOO_BIG = (
    "CrewAI 1.15's kickoff runs the crew's model validators twice per agent before the first LLM call, one of them "
    "walking the task list with pydantic's deep __eq__, so its set-up grows about as n^3 (benchmarks/README.md); "
    "raise --crewai-max-agents to wait for it"
)


@dataclass
class Bench:
    """One plan as every runner gets it: the plan, its file for the CLI, each agent's latency."""

    name: str
    plan: ExecutionPlan
    plan_file: Path
    latencies: dict[int, float]
    latency_spec: str  # the CLI's --fake-latency: seconds, or a JSON file of seconds by agent index


@dataclass
class Run:
    makespan: float
    wall: float  # the whole call: graph run, crew kickoff, or the CLI process (Ray's start included)


@dataclass
class Runner:
    label: str
    capped: bool  # bounded by the list schedule on --slots slots, else by the critical path
    run: Callable[[Bench], Run]
    max_agents: int | None = None  # larger plans are skipped, with the reason
    why_not: str = ""


class Spans:
    """Each agent's start and finish, taken inside its body; each agent must run exactly once."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.finishes: list[float] = []
        self.calls: Counter[int] = Counter()

    @contextmanager
    def agent(self, index: int) -> Iterator[None]:
        self.calls[index] += 1
        self.starts.append(time.perf_counter())
        try:
            yield
        finally:
            self.finishes.append(time.perf_counter())

    def makespan(self, bench: Bench) -> float:
        wrong = {index: self.calls[index] for index in range(len(bench.plan.agents)) if self.calls[index] != 1}
        if wrong:
            raise SystemExit(f"{bench.name}: agents not run exactly once (agent: calls): {wrong}")
        return max(self.finishes) - min(self.starts)


def run_asyncio(bench: Bench) -> Run:
    widest = max(len(layer) for layer in bench.plan.get_execution_layers())
    wall = run_layer_by_layer(bench.plan, bench.latencies, workers=widest)
    return Run(makespan=wall, wall=wall)


def merge(old: dict[int, str], new: dict[int, str]) -> dict[int, str]:
    return {**old, **new}


class GraphState(TypedDict):
    outputs: Annotated[dict[int, str], merge]  # every agent's answer by index; parallel nodes merge theirs


def langgraph_runner(max_concurrency: int | None) -> Callable[[Bench], Run]:
    from langgraph.graph import START, StateGraph

    def run(bench: Bench) -> Run:
        spans = Spans()

        def node(index: int) -> Callable[[GraphState], Any]:
            async def call_llm(state: GraphState) -> dict[str, dict[int, str]]:
                with spans.agent(index):
                    await asyncio.sleep(bench.latencies[index])
                return {"outputs": {index: ANSWER}}

            return call_llm

        builder = StateGraph(GraphState)
        for index, spec in enumerate(bench.plan.agents):
            builder.add_node(f"agent_{index}", node(index))
            builder.add_edge([f"agent_{dep}" for dep in spec.depends_on] if spec.depends_on else START, f"agent_{index}")
        graph = builder.compile()
        config: dict[str, Any] = {"recursion_limit": len(bench.plan.agents) + 1}
        if max_concurrency is not None:
            config["max_concurrency"] = max_concurrency
        started = time.perf_counter()
        final = asyncio.run(graph.ainvoke({"outputs": {}}, config))
        wall = time.perf_counter() - started
        assert len(final["outputs"]) == len(bench.plan.agents)
        return Run(makespan=spans.makespan(bench), wall=wall)

    return run


def crewai_runner() -> Callable[[Bench], Run]:
    # CrewAI's own switches: no telemetry export, no trace upload or prompt (set before the import reads them).
    os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")
    from crewai import Agent, Crew, Process, Task
    from crewai.llms.base_llm import BaseLLM

    logging.getLogger("crewai.llms.base_llm").setLevel(logging.ERROR)  # one warning per call: no native token count

    def run(bench: Bench) -> Run:
        spans = Spans()

        class SleepingLLM(BaseLLM):
            """Sleeps the agent's latency and answers a fixed string."""

            agent_index: int

            def call(
                self,
                messages: Any,
                tools: Any = None,
                callbacks: Any = None,
                available_functions: Any = None,
                from_task: Any = None,
                from_agent: Any = None,
                response_model: Any = None,
            ) -> str:
                with spans.agent(self.agent_index):
                    time.sleep(bench.latencies[self.agent_index])
                return ANSWER

        tasks: dict[int, Task] = {}
        ordered: list[Task] = []
        for layer in bench.plan.get_execution_layers():
            barrier = min(layer, key=lambda index: (bench.latencies[index], index))
            for index in [*(index for index in layer if index != barrier), barrier]:
                spec = bench.plan.agents[index]
                agent = Agent(
                    role=f"{spec.role} {index}",
                    goal=spec.task,
                    backstory=spec.role,
                    allow_delegation=False,
                    llm=SleepingLLM(model="sleeping-fake", agent_index=index),
                )
                tasks[index] = Task(
                    description=spec.task,
                    expected_output="text",
                    agent=agent,
                    context=[tasks[dep] for dep in spec.depends_on],
                    async_execution=index != barrier,
                )
                ordered.append(tasks[index])
        crew = Crew(agents=[task.agent for task in ordered], tasks=ordered, process=Process.sequential)
        started = time.perf_counter()
        crew.kickoff()
        wall = time.perf_counter() - started
        return Run(makespan=spans.makespan(bench), wall=wall)

    return run


def metaagent_runner(slots: int | None, work: Path) -> Callable[[Bench], Run]:
    """A cold CLI run with --slots `slots` (None: one slot per agent, i.e. no cap)."""

    def run(bench: Bench) -> Run:
        size = len(bench.plan.agents)
        run_dir = Path(tempfile.mkdtemp(dir=work, prefix=f"{bench.name}-")) / "run"
        watched = run_cold(bench.plan_file, size, slots or size, run_dir, latency=bench.latency_spec)
        record = RunRecord.model_validate_json((run_dir / "record.json").read_text())
        if record.status != "ok":
            raise SystemExit(f"{bench.name}: metaagent-ray run ended {record.status}: agents {record.failed_agents()}")
        makespan = record.makespan()
        assert makespan is not None
        return Run(makespan=makespan, wall=watched["wall"])

    return run


def installed(module: str, label: str) -> bool:
    if importlib.util.find_spec(module) is not None:
        return True
    print(f"{label} is not installed (pip install -e '.[bench]'): its rows are skipped")
    return False


def runners(slots: int, work: Path, chosen: set[str], crewai_max_agents: int) -> list[Runner]:
    found: list[Runner] = []
    if "asyncio" in chosen:
        found.append(Runner("asyncio layers", False, run_asyncio))
    if "langgraph" in chosen and installed("langgraph", "LangGraph"):
        found.append(Runner("LangGraph", False, langgraph_runner(None)))
        found.append(Runner(f"LangGraph, max_concurrency={slots}", True, langgraph_runner(slots)))
    if "crewai" in chosen and installed("crewai", "CrewAI"):
        found.append(Runner("CrewAI", False, crewai_runner(), crewai_max_agents, CREWAI_TOO_BIG))
    if "metaagent" in chosen:
        found.append(Runner(f"metaagent-ray, --slots {slots}", True, metaagent_runner(slots, work)))
        found.append(Runner("metaagent-ray, no cap", False, metaagent_runner(None, work)))
    return found


def benches(args: argparse.Namespace, work: Path) -> list[Bench]:
    found = []
    if args.examples:
        for name in WORKFLOWS:
            plan_file = EXAMPLES / f"{name}.json"
            plan = load_plan(plan_file)
            latencies = simulated_latencies(name, len(plan.agents), args.scale)
            latency_file = work / f"{name}-latency.json"
            latency_file.write_text(json.dumps({"default": 0.0, **{str(agent): seconds for agent, seconds in latencies.items()}}))
            found.append(Bench(name, plan, plan_file, latencies, str(latency_file)))
    for size in args.sizes:
        data = random_dag(size, SEEDS.get(size, size), depth=args.depth)
        plan_file = work / f"dag-{size}.json"
        plan_file.write_text(json.dumps(data))
        plan = parse_plan(data, max_agents=size)
        found.append(Bench(f"DAG of {size}", plan, plan_file, {agent: args.latency for agent in range(size)}, str(args.latency)))
    return found


Results = dict[tuple[str, str], list[Run]]  # (plan, runner) -> its runs; absent where the runner was skipped


def run_all(plans: list[Bench], chosen: list[Runner], repeat: int) -> Results:
    results: Results = {}
    for bench in plans:
        for runner in chosen:
            if runner.max_agents is not None and len(bench.plan.agents) > runner.max_agents:
                print(f"  {bench.name}: {runner.label} skipped above {runner.max_agents} agents: {runner.why_not}", flush=True)
                continue
            runs = results[bench.name, runner.label] = [runner.run(bench) for _ in range(repeat)]
            print(f"  {bench.name}: {runner.label}: makespan {', '.join(f'{run.makespan:.2f}' for run in runs)} s", flush=True)
    return results


def print_tables(plans: list[Bench], chosen: list[Runner], results: Results, slots: int, repeat: int) -> None:
    def median(bench: Bench, runner: Runner, field: str) -> float | None:
        runs = results.get((bench.name, runner.label))
        return statistics.median(getattr(run, field) for run in runs) if runs else None

    print(
        f"\nmakespan / bound (median makespan in s; median of {repeat} run(s)). Bound: the critical path for runners "
        f"without a cap, the longest-path-first list schedule on {slots} slots for capped ones (max_concurrency={slots}, "
        f"--slots {slots}). metaagent-ray: cold CLI; no cap: --slots = the plan's agents.\n"
    )
    print(
        f"| plan | agents | layers | critical path (s) | list schedule, {slots} slots (s) | "
        + " | ".join(runner.label for runner in chosen)
        + " |"
    )
    print("|---|---:|---:|---:|---:|" + "---:|" * len(chosen))
    for bench in plans:
        critical, _ = bench.plan.critical_path(bench.latencies)
        scheduled = list_schedule(bench.plan, bench.latencies, slots)
        cells = []
        for runner in chosen:
            makespan = median(bench, runner, "makespan")
            cells.append("skipped" if makespan is None else f"{makespan / (scheduled if runner.capped else critical):.3f} ({makespan:.2f})")
        print(
            f"| {bench.name} | {len(bench.plan.agents)} | {len(bench.plan.get_execution_layers())} | {critical:.2f} | "
            f"{scheduled:.2f} | " + " | ".join(cells) + " |"
        )

    print("\nWhole call (s, median): graph ainvoke, crew kickoff, or the cold CLI process (Ray's start included)\n")
    print("| plan | " + " | ".join(runner.label for runner in chosen) + " |")
    print("|---|" + "---:|" * len(chosen))
    for bench in plans:
        walls = [median(bench, runner, "wall") for runner in chosen]
        print(f"| {bench.name} | " + " | ".join("skipped" if wall is None else f"{wall:.1f}" for wall in walls) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100], help="random DAGs of these many agents (none: examples only)")
    parser.add_argument("--depth", type=int, default=9, help="layers of each random DAG")
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per agent in the random DAGs")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the example plans' latencies (0.3-2.0 s) by this")
    parser.add_argument("--examples", action=argparse.BooleanOptionalAction, default=True, help="run the example plans too")
    parser.add_argument("--slots", type=int, default=64, help="the cap of the capped runners")
    parser.add_argument("--repeat", type=int, default=1, help="runs per plan and runner; the table shows medians")
    parser.add_argument(
        "--runners",
        nargs="+",
        choices=["asyncio", "langgraph", "crewai", "metaagent"],
        default=["asyncio", "langgraph", "crewai", "metaagent"],
    )
    parser.add_argument("--crewai-max-agents", type=int, default=500, help="skip CrewAI on larger plans (its set-up grows as n^3)")
    args = parser.parse_args()
    print("$ python " + shlex.join(["benchmarks/peers.py", *sys.argv[1:]]))
    with tempfile.TemporaryDirectory(prefix="peers-") as directory:
        work = Path(directory)
        chosen = runners(args.slots, work, set(args.runners), args.crewai_max_agents)
        plans = benches(args, work)
        results = run_all(plans, chosen, args.repeat)
    print_tables(plans, chosen, results, args.slots, args.repeat)


if __name__ == "__main__":
    main()
