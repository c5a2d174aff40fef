"""Streamed plan dispatch and cold starts, measured the way a user meets them: cold CLI commands.

1. The plan as a barrier (`--fake`): `metaagent run` with the fake backend answering each of the
   seed's workflows as its plan (`--fake-plan`), the coordinator writing it evenly over
   `--coordinator` seconds (4 by default), the agents taking the seeded latencies of
   benchmarks/scheduling.py. Streamed and `--no-stream-plan` runs alternate. Reported: how long
   after its JSON object was complete the first agent started (its `submitted_at` is the moment the
   parser saw the object close), and end-to-end time (coordinator start to last agent finish),
   streamed / whole.
2. Cold starts (`--exec`): `metaagent exec` of each workflow, `--repeat` times, each in a fresh
   process that starts Ray: makespan / critical path of the nominal latencies.
3. The README's main command on the embedded model (`--local`): streamed and whole runs alternate;
   reported: whether the first agent started before the plan was complete, and end-to-end time.

Run:  python benchmarks/streaming.py [--fake] [--exec] [--local] [--repeat 5] [--coordinator 4]
(no section flag: all three)
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scheduling import EXAMPLES, WORKFLOWS, simulated_latencies

from metaagent_ray import RunRecord, load_plan

MAIN_QUERY = "Compare Python and Rust for web development"


def cli(*args: str) -> float:
    """Run one cold `metaagent` command; its wall time."""
    command = [sys.executable, "-m", "metaagent_ray", *args, "--progress", "plain", "-q"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return time.perf_counter() - started


def end_to_end(record: RunRecord) -> float:
    """Coordinator start to last agent finish."""
    assert record.coordinator is not None and record.coordinator.started_at is not None
    return max(agent.finished_at or 0.0 for agent in record.agents) - record.coordinator.started_at


def first_start_delay(record: RunRecord) -> float:
    """The first submitted agent's start minus its submission: its object's completion, when streamed."""
    first = min(record.agents, key=lambda agent: agent.submitted_at or float("inf"))
    assert first.started_at is not None and first.submitted_at is not None
    return first.started_at - first.submitted_at


def fake_section(directory: Path, repeat: int, coordinator: float) -> None:
    print(f"\n## Streamed plan dispatch, fake backend, coordinator {coordinator:g} s, {repeat} alternating runs each\n")
    print(
        "| workflow | first agent's start after its object was complete (ms, max) | end-to-end streamed (s) | end-to-end whole (s) | streamed / whole |"
    )
    print("|---|---:|---:|---:|---:|")
    for name in WORKFLOWS:
        plan = load_plan(EXAMPLES / f"{name}.json")
        latency = directory / f"{name}-latency.json"
        seconds = simulated_latencies(name, len(plan.agents), 1.0)
        latency.write_text(json.dumps({"coordinator": coordinator, **{str(agent): value for agent, value in seconds.items()}}))
        times: dict[bool, list[float]] = {True: [], False: []}
        delays: list[float] = []
        for attempt in range(repeat):
            for streamed in (True, False):
                record_file = directory / f"{name}-{attempt}-{streamed}.json"
                flags = [] if streamed else ["--no-stream-plan"]
                cli(
                    "run",
                    f"{plan.description}",
                    "--llm",
                    "fake",
                    "--fake-plan",
                    str(EXAMPLES / f"{name}.json"),
                    "--fake-latency",
                    str(latency),
                    "--record",
                    str(record_file),
                    "--run-dir",
                    str(directory / f"{name}-{attempt}-{streamed}"),
                    *flags,
                )
                record = RunRecord.model_validate_json(record_file.read_text())
                times[streamed].append(end_to_end(record))
                if streamed:
                    delays.append(first_start_delay(record))
        ratio = statistics.median(times[True]) / statistics.median(times[False])
        print(
            f"| {name} | {statistics.median(delays) * 1000:.0f} (max {max(delays) * 1000:.0f}) | {statistics.median(times[True]):.2f} "
            f"| {statistics.median(times[False]):.2f} | {ratio:.2f} |"
        )


def exec_section(directory: Path, repeat: int) -> None:
    print(f"\n## Cold `metaagent exec`, {repeat} runs per workflow, each in a fresh process that starts Ray\n")
    print("| workflow | critical path (s) | makespan / critical path, each run | worst | whole command (s, median) |")
    print("|---|---:|---|---:|---:|")
    for name in WORKFLOWS:
        plan = load_plan(EXAMPLES / f"{name}.json")
        seconds = simulated_latencies(name, len(plan.agents), 1.0)
        latency = directory / f"{name}-exec-latency.json"
        latency.write_text(json.dumps({str(agent): value for agent, value in seconds.items()}))
        critical, _ = plan.critical_path(seconds)
        ratios, walls = [], []
        for attempt in range(repeat):
            record_file = directory / f"{name}-exec-{attempt}.json"
            walls.append(
                cli(
                    "exec",
                    str(EXAMPLES / f"{name}.json"),
                    "--llm",
                    "fake",
                    "--fake-latency",
                    str(latency),
                    "--record",
                    str(record_file),
                    "--run-dir",
                    str(directory / f"{name}-exec-{attempt}"),
                )
            )
            makespan = RunRecord.model_validate_json(record_file.read_text()).makespan()
            assert makespan is not None
            ratios.append(makespan / critical)
        shown = ", ".join(f"{ratio:.3f}" for ratio in ratios)
        print(f"| {name} | {critical:.2f} | {shown} | {max(ratios):.3f} | {statistics.median(walls):.1f} |")


def local_section(directory: Path, repeat: int) -> None:
    print(f"\n## The README's main command on the embedded model, {repeat} alternating runs each\n")
    print("| run | plan complete after (s) | first agent started after (s) | end-to-end (s) | whole command (s) | started early | set aside |")
    print("|---|---:|---:|---:|---:|---|---|")
    for attempt in range(repeat):
        for streamed in (True, False):
            record_file = directory / f"local-{attempt}-{streamed}.json"
            flags = [] if streamed else ["--no-stream-plan"]
            wall = cli(
                "run",
                MAIN_QUERY,
                "--llm",
                "local",
                "--record",
                str(record_file),
                "--run-dir",
                str(directory / f"local-{attempt}-{streamed}"),
                *flags,
            )
            record = RunRecord.model_validate_json(record_file.read_text())
            coordinator = record.coordinator
            assert coordinator is not None and coordinator.started_at is not None and coordinator.finished_at is not None
            first = min(agent.started_at or float("inf") for agent in record.agents)
            label = "streamed" if streamed else "whole (--no-stream-plan)"
            print(
                f"| {label} | {coordinator.finished_at - coordinator.started_at:.1f} | {first - coordinator.started_at:.1f} "
                f"| {end_to_end(record):.1f} | {wall:.1f} | {coordinator.started_early or '-'} | {coordinator.set_aside or '-'} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fake", action="store_true", help="streamed dispatch with the fake backend")
    parser.add_argument("--exec", action="store_true", help="cold exec runs of the seed's workflows")
    parser.add_argument("--local", action="store_true", help="the README's main command on the embedded model")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--local-repeat", type=int, default=2)
    parser.add_argument("--coordinator", type=float, default=4.0, help="seconds the fake coordinator takes to write its plan")
    args = parser.parse_args()
    every = not (args.fake or args.exec or args.local)
    print(f"$ {shlex.join([sys.executable, *sys.argv])}")
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        if args.fake or every:
            fake_section(directory, args.repeat, args.coordinator)
        if args.exec or every:
            exec_section(directory, args.repeat)
        if args.local or every:
            local_section(directory, args.local_repeat)


if __name__ == "__main__":
    main()
