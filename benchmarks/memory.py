"""What one local-model instance really costs in RAM, measured inside Ray workers.

Each measurement runs in a fresh Ray worker process (a task with `max_calls=1`), as a run's agents
do, and reads the worker's own /proc/self/status after each step:

1. the idle worker (metaagent_ray imported, nothing loaded);
2. the model loaded: `get_llm(LLMConfig(backend="local", ...))` and a 1-token call;
3. one plain call: a RESEARCHER agent's real prompt, up to 128 tokens;
4. one schema-constrained call: the coordinator's real plan request (`make_plan`, a llama.cpp grammar).

RSS is split into anonymous memory (private to the process) and file pages. llama.cpp maps the GGUF
file, so its weights are file pages: the kernel keeps one copy for every process that maps the same
file. The last table loads two instances at once and reads their proportional set size (Pss, from
/proc/self/smaps_rollup), which splits shared pages between the processes: it shows what a second
instance really adds. Linux only. Run:

    python benchmarks/memory.py [--n-ctx 2048 4096 8192] [--model FILE.gguf]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import sys
from pathlib import Path

import ray

from metaagent_ray.agents import AgentContext, build_messages
from metaagent_ray.coordinator import make_plan
from metaagent_ray.llm import LLMConfig, LLMRequest, get_llm
from metaagent_ray.plan import AgentSpec, Role

QUERY = "Compare Python, Rust, and Go for web development"
MiB = 1024 * 1024


def status_bytes() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM (peak RSS) of this process, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def pss_bytes() -> dict[str, int]:
    """Pss, Pss_Anon and Pss_File of this process (shared pages divided among their sharers), in bytes."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Pss", "Pss_Anon", "Pss_File"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def researcher_request() -> LLMRequest:
    """The first RESEARCHER agent's call for QUERY, built as the agents build it."""
    spec = AgentSpec(role=Role.RESEARCHER, task="Research Python for web development")
    context = AgentContext(agent_id=0, spec=spec, query=QUERY, llm=LLMConfig(backend="local"))
    return LLMRequest(
        messages=build_messages(context, [], {}),
        caller="agent",
        query=QUERY,
        agent_id=0,
        role=spec.role.value,
        task=spec.task,
        max_tokens=128,
    )


@ray.remote(num_cpus=0, max_calls=1)
def measure_instance(config: dict) -> list[tuple[str, dict[str, int]]]:
    """RSS of this fresh worker after each step of loading and using one local model."""
    steps = [("idle Ray worker", status_bytes())]
    llm = get_llm(LLMConfig.model_validate(config))
    request = researcher_request()
    llm.complete(LLMRequest(messages=request.messages, caller="agent", max_tokens=1))
    steps.append(("model loaded (1-token call)", status_bytes()))
    llm.complete(request)
    steps.append(("after a plain call (128 tokens)", status_bytes()))
    make_plan(QUERY, llm, max_agents=64)
    steps.append(("after a schema-constrained call (coordinator plan)", status_bytes()))
    return steps


@ray.remote(num_cpus=0)
class Barrier:
    """Lets the two instances read their memory only once both have loaded the model."""

    def __init__(self, parties: int) -> None:
        self.waiting = parties
        self.everyone = asyncio.Event()

    async def wait(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.everyone.set()
        await self.everyone.wait()


@ray.remote(num_cpus=0, max_calls=1)
def measure_shared(config: dict, barrier: ray.actor.ActorHandle) -> dict[str, int]:
    """Pss of this worker's loaded, used model while another worker holds the same model."""
    llm = get_llm(LLMConfig.model_validate(config))
    llm.complete(researcher_request())
    ray.get(barrier.wait.remote())
    return {**status_bytes(), **pss_bytes()}


def mib(value: int) -> str:
    return f"{value / MiB:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-ctx", type=int, nargs="+", default=[2048, 4096, 8192], help="context sizes to measure")
    parser.add_argument("--model", default=None, help="a .gguf file (default: Gemma 3 270M)")
    args = parser.parse_args()

    ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    model_file = get_llm(LLMConfig(backend="local", model=args.model)).model_path()
    configs = {n_ctx: LLMConfig(backend="local", model=args.model, options={"n_ctx": n_ctx}).model_dump() for n_ctx in args.n_ctx}
    results = {n_ctx: ray.get(measure_instance.remote(config)) for n_ctx, config in configs.items()}
    barrier = Barrier.remote(2)
    shared_config = configs[4096 if 4096 in configs else args.n_ctx[0]]
    shared = ray.get([measure_shared.remote(shared_config, barrier) for _ in range(2)])
    ray.shutdown()

    print(f"Model: {model_file.name}, {model_file.stat().st_size / MiB:.0f} MiB; 1 thread per instance.")
    print(f"Measured {datetime.date.today().isoformat()} on {os.cpu_count()} cores; MiB.\n")
    print("| n_ctx | step | RSS | anonymous | file pages | growth over idle (anonymous) |")
    print("|---:|---|---:|---:|---:|---:|")
    for n_ctx, steps in results.items():
        idle = steps[0][1]
        for name, fields in steps:
            growth = fields["RssAnon"] - idle["RssAnon"]
            print(f"| {n_ctx} | {name} | {mib(fields['VmRSS'])} | {mib(fields['RssAnon'])} | {mib(fields['RssFile'])} | {mib(growth)} |")
        print(f"| {n_ctx} | peak RSS (VmHWM) | {mib(steps[-1][1]['VmHWM'])} | | | |")
    print(f"\nTwo instances loaded at once (n_ctx {shared_config['options']['n_ctx']}), each after a plain call:\n")
    print("| instance | RSS | Pss | Pss anonymous | Pss file pages |")
    print("|---:|---:|---:|---:|---:|")
    for index, fields in enumerate(shared, 1):
        print(f"| {index} | {mib(fields['VmRSS'])} | {mib(fields['Pss'])} | {mib(fields['Pss_Anon'])} | {mib(fields['Pss_File'])} |")
    print(f"\nCommand: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
