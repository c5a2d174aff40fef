"""One local LLM with all the threads, or one instance per core?

The workload is the seed's first query, "Compare Python, Rust, and Go for web development": its three
RESEARCHER agents, with the real prompts, each answered by the `local` backend (Gemma 3 270M by
default). The configurations:

- 1 instance x N threads: one process answers the three requests one after another;
- N instances x 1 thread: N processes answer them concurrently, as N Ray workers with one slot each.

Each instance runs in its own process (a Llama object is not thread-safe) and loads the model before
the clock starts. The configurations take turns for `--repeat` rounds, so background load hits both
alike; the table shows the median round. Run:

    python benchmarks/local_threads.py [--max-tokens 128] [--repeat 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass
from multiprocessing.pool import Pool
from typing import Any

from metaagent_ray.agents import AgentContext, build_messages
from metaagent_ray.llm import LLM, LLMConfig, LLMRequest, get_llm
from metaagent_ray.plan import AgentSpec, Role

QUERY = "Compare Python, Rust, and Go for web development"
TOPICS = ["Python", "Rust", "Go"]

_llm: LLM | None = None  # this worker process's instance


@dataclass(frozen=True)
class Round:
    """One pass over the workload by one configuration."""

    wall_s: float
    prompt_tokens: int
    completion_tokens: int


def researcher_requests(max_tokens: int) -> list[LLMRequest]:
    """The three researcher calls of the query, built exactly as the agents build them."""
    requests = []
    for agent_id, topic in enumerate(TOPICS):
        spec = AgentSpec(role=Role.RESEARCHER, task=f"Research {topic} for web development")
        context = AgentContext(agent_id=agent_id, spec=spec, query=QUERY, llm=LLMConfig(backend="local"))
        requests.append(
            LLMRequest(
                messages=build_messages(context, [], {}),
                caller="agent",
                query=QUERY,
                agent_id=agent_id,
                role=spec.role.value,
                task=spec.task,
                max_tokens=max_tokens,
            )
        )
    return requests


def _load(config: dict[str, Any], ready: Any) -> None:
    """Pool initializer: load and warm the model, then wait until every worker and the driver are ready."""
    global _llm
    _llm = get_llm(LLMConfig.model_validate(config))
    _llm.complete(LLMRequest(messages=researcher_requests(1)[0].messages, caller="agent", max_tokens=1))
    ready.wait()


def _answer(request: LLMRequest) -> tuple[int, int]:
    assert _llm is not None
    response = _llm.complete(request)
    return response.prompt_tokens or 0, response.completion_tokens or 0


def start_pool(instances: int, threads: int, model: str | None) -> Pool:
    """`instances` worker processes, each holding one loaded model with `threads` threads."""
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(instances + 1)
    config = LLMConfig(backend="local", model=model, options={"n_threads": threads}).model_dump()
    pool = context.Pool(instances, initializer=_load, initargs=(config, ready))
    ready.wait()
    return pool


def run_round(pool: Pool, requests: list[LLMRequest]) -> Round:
    start = time.perf_counter()
    counts = pool.map(_answer, requests, chunksize=1)
    wall = time.perf_counter() - start
    return Round(wall, sum(prompt for prompt, _ in counts), sum(completion for _, completion in counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128, help="answer length limit per request")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per configuration (median reported)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="threads to share out")
    parser.add_argument("--model", default=None, help="a .gguf file (default: Gemma 3 270M)")
    args = parser.parse_args()
    if args.cores < 2:
        parser.error("--cores must be at least 2: with one core both configurations are the same")

    requests = researcher_requests(args.max_tokens)
    configurations = {
        f"1 instance x {args.cores} threads (sequential)": (1, args.cores),
        f"{args.cores} instances x 1 thread (concurrent)": (args.cores, 1),
    }
    pools = {name: start_pool(instances, threads, args.model) for name, (instances, threads) in configurations.items()}
    rounds: dict[str, list[Round]] = {name: [] for name in configurations}
    loads = []
    for _ in range(args.repeat):
        for name, pool in pools.items():
            loads.append(os.getloadavg()[0])
            rounds[name].append(run_round(pool, requests))
    for pool in pools.values():
        pool.close()
        pool.join()

    print(f"Workload: the 3 RESEARCHER calls of {QUERY!r}, max_tokens={args.max_tokens}; median of {args.repeat} rounds.")
    print(f"Machine: {os.cpu_count()} cores; 1-minute load average during the runs {min(loads):.1f}-{max(loads):.1f}.\n")
    print("| configuration | wall s | prompt tokens | completion tokens | completion tok/s | all tok/s |")
    print("|---|---:|---:|---:|---:|---:|")
    medians = {}
    for name, results in rounds.items():
        median = sorted(results, key=lambda result: result.wall_s)[len(results) // 2]
        medians[name] = median.wall_s
        total = median.prompt_tokens + median.completion_tokens
        print(
            f"| {name} | {median.wall_s:.2f} | {median.prompt_tokens} | {median.completion_tokens} "
            f"| {median.completion_tokens / median.wall_s:.1f} | {total / median.wall_s:.1f} |"
        )
    fastest, slowest = sorted(medians, key=medians.__getitem__)
    mean_ratio = statistics.mean(result.wall_s for result in rounds[slowest]) / statistics.mean(result.wall_s for result in rounds[fastest])
    print(f"\nFaster: {fastest}, {medians[slowest] / medians[fastest]:.2f}x by median wall time ({mean_ratio:.2f}x by mean).")
    print(f"Command: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
