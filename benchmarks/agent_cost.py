"""What one agent in flight costs on a node, for the slot formula (metaagent_ray/resources.py).

An agent runs as one thread of its node's executor actor (executors.py) and waits there on its LLM
call. This runs, with one process's executor kept between runs (as the CLI's process does):

1. a plan of one agent, then
2. a plan of N independent agents, all in flight at once (`--slots N`),

for each backend below, and samples the executor process's memory (/proc/PID/status: RssAnon, the
anonymous memory private to it) every 0.1 s while the agents wait on their calls. The cost of one
more agent in flight is (peak with N - peak with 1) / (N - 1); the executor's own process is the
peak with 1 less that. Backends: the fake LLM (the call sleeps: a thread and the agent's own
objects) and the `openai` backend against a stand-in OpenAI-compatible server on 127.0.0.1 that
holds each call for the latency (a thread, an httpx client and its connection). The model
server's memory per parallel slot is the backend's own figure (benchmarks/local_engines.py for
the local backend). Linux only. Run:

    python benchmarks/agent_cost.py [--agents 64] [--latency 6]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' stand-in server

from metaagent_ray import AgentStarted, Event, ExecutionPlan, MetaAgent  # noqa: E402
from tests.stand_in_server import StandInServer  # noqa: E402

MiB = 1024 * 1024


def anonymous_bytes(pid: int) -> int:
    """RssAnon of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no RssAnon for process {pid}")


class PeakSampler:
    """The executor's peak RssAnon while the run's agents are in flight, sampled in a thread."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def on_event(self, event: Event) -> None:
        if isinstance(event, AgentStarted):
            self.pids.add(event.pid)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            for pid in list(self.pids):
                self.peak = max(self.peak, anonymous_bytes(pid))


def independent_plan(agents: int) -> ExecutionPlan:
    return ExecutionPlan.model_validate(
        {
            "description": f"{agents} independent researchers",
            "agents": [{"role": "researcher", "task": f"Research topic {index}", "depends_on": []} for index in range(agents)],
        }
    )


def measure(llm: str, model: str | None, options: dict, agents: int) -> tuple[int, int]:
    """(peak RssAnon with one agent in flight, with `agents` in flight) of the same executor process."""
    peaks, pids = [], set()
    with MetaAgent(llm=llm, model=model, llm_options=options, slots=agents) as meta:
        for count in (1, agents):
            with PeakSampler() as sampler:
                meta.on_event = sampler.on_event
                record = meta.execute(independent_plan(count), "agent cost", save=False)
            assert record.status == "ok", record.failed_agents()
            peaks.append(sampler.peak)
            pids |= sampler.pids
    assert len(pids) == 1, f"expected one executor process for both runs, saw {sorted(pids)}"
    return peaks[0], peaks[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=64, help="agents in flight at once (and slots)")
    parser.add_argument("--latency", type=float, default=6.0, help="seconds each LLM call waits")
    args = parser.parse_args()

    with StandInServer(api="openai", models=["stand-in"], delay=args.latency) as server:
        backends = {
            "fake (the call sleeps)": ("fake", None, {"latency": args.latency}),
            "openai (an HTTP call held by the server)": ("openai", "stand-in", {"base_url": server.base_url}),
        }
        rows = [(name, *measure(llm, model, options, args.agents)) for name, (llm, model, options) in backends.items()]

    print(f"Measured {datetime.date.today().isoformat()} on {os.cpu_count()} cores; the executor's RssAnon, MiB.\n")
    print(f"| backend | 1 agent in flight | {args.agents} in flight | per agent | executor alone |")
    print("|---|---:|---:|---:|---:|")
    for name, one, many in rows:
        per_agent = (many - one) / (args.agents - 1)
        print(f"| {name} | {one / MiB:.1f} | {many / MiB:.1f} | {per_agent / MiB:.2f} | {(one - per_agent) / MiB:.1f} |")
    print(f"\nCommand: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
