"""One plan through Ray Serve LLM replicas (`--serve-llm`), per replica count and router, in one session.

    python -m benchmarks.serve_llm                                   # 2 replicas: power-of-two, then prefix routing
    python -m benchmarks.serve_llm --replicas 1 2 --routers prefix   # makespan against 1 replica (gpu_check.sh)
    python -m benchmarks.serve_llm --thresholds 3 1000               # prefix routing spilling when a replica is full, or never

Starts Ray here, then for each (replicas, router) deploys a fresh Serve application of llama.cpp
replicas (serve_llm.py: empty caches, its own name, so Serve's prefix tree starts empty too), executes
the same plan of `--agents` agents (researchers, then analyzers over them, then a synthesizer) with
MetaAgent, reads the ingress's per-replica counts and deletes the application. Each row: the plan's
makespan, the requests each replica served, the prompt tokens, those llama.cpp took from a slot's
cache, those it read again (prompt minus cached: the shared prefixes re-read), and the completion
tokens per second of makespan.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import httpx
import ray
from ray import serve

from metaagent_ray.api import MetaAgent, ServeLLMSpec
from metaagent_ray.resources import SLOT_RESOURCE

QUERY = "Compare programming languages for web development"
SUBJECTS = ["Python", "Rust", "Go", "Java", "C#", "Ruby", "PHP", "JavaScript", "TypeScript", "Kotlin", "Elixir", "Scala", "Swift", "C++"]


def plan(agents: int) -> dict[str, Any]:
    """`agents` agents: researchers, three analyzers over a third of them each, one synthesizer over the analyzers."""
    researchers = agents - 4
    if not 3 <= researchers <= len(SUBJECTS):
        raise SystemExit(f"--agents must be between 7 and {len(SUBJECTS) + 4}")
    steps: list[dict[str, Any]] = [{"role": "RESEARCHER", "task": f"Research {subject}", "depends_on": []} for subject in SUBJECTS[:researchers]]
    for third in range(3):
        inputs = list(range(third, researchers, 3))
        steps.append({"role": "ANALYZER", "task": f"Compare {', '.join(SUBJECTS[i] for i in inputs)}", "depends_on": inputs})
    steps.append({"role": "SYNTHESIZER", "task": "Recommend one language", "depends_on": [researchers, researchers + 1, researchers + 2]})
    return {"description": f"{agents} agents", "agents": steps}


def measure(spec: ServeLLMSpec, steps: dict[str, Any], max_tokens: int) -> str:
    """One run through a fresh application: its row."""
    with MetaAgent(serve_llm=spec, max_tokens=max_tokens) as meta:
        started = time.perf_counter()
        record = meta.execute(steps, QUERY, save=False)
        makespan = time.perf_counter() - started
        replicas = httpx.get(f"http://127.0.0.1:{spec.http_port}{spec.route_prefix}/replicas", timeout=30).json()
    failed = sum(agent.status != "ok" for agent in record.agents)
    total = {key: sum(served[key] for served in replicas.values()) for key in ("prompt_tokens", "cached_tokens", "completion_tokens")}
    requests = " / ".join(str(served["requests"]) for served in sorted(replicas.values(), key=lambda served: -served["requests"]))
    router = f"prefix, threshold {spec.load_threshold}" if spec.router == "prefix" else spec.router
    return (
        f"| {spec.replicas} | {router} | {makespan:.1f} s | {requests} | {total['prompt_tokens']} | {total['cached_tokens']} "
        f"| {total['prompt_tokens'] - total['cached_tokens']} | {total['completion_tokens'] / makespan:.1f} | {failed} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--replicas", type=int, nargs="+", default=[2])
    parser.add_argument("--routers", nargs="+", choices=["power_of_two", "prefix"], default=["power_of_two", "prefix"])
    parser.add_argument("--parallel", type=int, default=4, help="each replica's parallel slots")
    parser.add_argument(
        "--thresholds", type=int, nargs="+", default=[None], help="the prefix router's imbalanced_threshold, one row each (default: parallel - 1)"
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="every answer's budget")
    parser.add_argument("--n-ctx", type=int, default=2048, help="each slot's context")
    parser.add_argument("--threads", type=int, default=1, help="each replica's llama.cpp threads")
    parser.add_argument("--cpus-per-replica", type=float, default=0)
    parser.add_argument("--gpus-per-replica", type=float, default=0)
    parser.add_argument("--model", default=None, help="a .gguf file (default: the local extra's Gemma 3 270M)")
    parser.add_argument("--port", type=int, default=8000, help="Serve's HTTP port")
    args = parser.parse_args()
    steps = plan(args.agents)
    ray.init(address="local", resources={SLOT_RESOURCE: max(args.replicas) * args.parallel}, include_dashboard=False, logging_level=logging.ERROR)
    print(f"{args.agents} agents, {args.parallel} slots per replica, answers of at most {args.max_tokens} tokens")
    print("| replicas | router | makespan | requests per replica | prompt tokens | cached | re-read | completion tokens/s | failed |")
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|")
    try:
        for replicas in args.replicas:
            rows = [(router, threshold) for router in args.routers for threshold in (args.thresholds if router == "prefix" else [None])]
            for router, threshold in rows:
                name = f"bench-{replicas}-{router.replace('_', '-')}-{threshold}"
                spec = ServeLLMSpec(
                    name=name,
                    route_prefix=f"/{name}",
                    http_port=args.port,
                    replicas=replicas,
                    parallel=args.parallel,
                    cpus_per_replica=args.cpus_per_replica,
                    gpus_per_replica=args.gpus_per_replica,
                    model=args.model,
                    router=router,
                    imbalanced_threshold=threshold,
                    local={"n_ctx": args.n_ctx, "n_threads": args.threads},
                )
                print(measure(spec, steps, args.max_tokens), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
