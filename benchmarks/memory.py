"""What one agent's Ray worker costs in RAM while it uses the local model, measured inside Ray.

Each measurement runs in a fresh Ray worker process (a task with `max_calls=1`), as a run's agents
do, and reads the worker's own /proc/self/status after each step:

1. the idle worker (metaagent_ray imported, nothing loaded);
2. after one plain call: a RESEARCHER agent's real prompt, up to 128 tokens;
3. after one schema-constrained call: the coordinator's real plan request (`make_plan`).

The model itself is not in the worker: the local backend's server is one Ray actor per node
(local_server.py; its memory per slot is measured by benchmarks/local_engines.py), so a worker only
holds the HTTP client. RSS is split into anonymous memory (private to the process) and file pages.
Linux only. Run:

    python benchmarks/memory.py [--model FILE.gguf]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
from pathlib import Path

import ray

from metaagent_ray.agents import AgentContext, build_messages
from metaagent_ray.api import run_limits
from metaagent_ray.coordinator import make_plan
from metaagent_ray.llm import LLMConfig, LLMRequest, get_llm
from metaagent_ray.plan import AgentSpec, Role
from metaagent_ray.settings import RunSettings

QUERY = "Compare Python, Rust, and Go for web development"
LIMITS = run_limits(RunSettings()).agent  # what a run with default settings gives its agents
MiB = 1024 * 1024


def status_bytes() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM (peak RSS) of this process, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def researcher_request() -> LLMRequest:
    """The first RESEARCHER agent's call for QUERY, built as the agents build it."""
    spec = AgentSpec(role=Role.RESEARCHER, task="Research Python for web development")
    context = AgentContext(agent_id=0, spec=spec, query=QUERY, llm=LLMConfig(backend="local"), limits=LIMITS)
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
def measure_agent_worker(config: dict) -> list[tuple[str, dict[str, int]]]:
    """RSS of this fresh worker after each step of using the node's local model server."""
    steps = [("idle Ray worker", status_bytes())]
    llm = get_llm(LLMConfig.model_validate(config))
    llm.complete(researcher_request())
    steps.append(("after a plain call (128 tokens)", status_bytes()))
    make_plan(QUERY, llm, max_agents=64, answer_tokens=RunSettings().answer_tokens)
    steps.append(("after a schema-constrained call (coordinator plan)", status_bytes()))
    return steps


def mib(value: int) -> str:
    return f"{value / MiB:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a .gguf file (default: Gemma 3 270M)")
    args = parser.parse_args()

    ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    steps = ray.get(measure_agent_worker.remote(LLMConfig(backend="local", model=args.model).model_dump()))
    ray.shutdown()

    print(f"Measured {datetime.date.today().isoformat()} on {os.cpu_count()} cores; MiB.\n")
    print("| step | RSS | anonymous | file pages | growth over idle (anonymous) |")
    print("|---|---:|---:|---:|---:|")
    idle = steps[0][1]
    for name, fields in steps:
        growth = fields["RssAnon"] - idle["RssAnon"]
        print(f"| {name} | {mib(fields['VmRSS'])} | {mib(fields['RssAnon'])} | {mib(fields['RssFile'])} | {mib(growth)} |")
    print(f"\nCommand: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
