"""The README's main command against llama.cpp's own server (`--llm openai`) vs the embedded default.

    python -m benchmarks.openai_server [--rounds 2] [--parallel 4]   # from the checkout's root

Starts a user's llama.cpp server (tests/llama_server.py: xllamacpp's `Server` serving the same Gemma 3
270M GGUF the `local` extra ships, `--parallel` slots, model name "gemma") and then runs, alternating,
in fresh processes:

    metaagent run "Compare Python and Rust for web development"
    metaagent run "Compare Python and Rust for web development" --llm openai --openai-base-url URL --model gemma

Each row is one whole command's wall time (Ray's start included), the tokens the run's model calls
wrote, the most one agent wrote, and how many answers were cut at a repeat or still carry a
chat-template marker. The ratio compares the mean wall times of the two commands.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from metaagent_ray.llm.bounds import TEMPLATE_MARKERS
from metaagent_ray.record import RunRecord
from tests.llama_server import serving

QUERY = "Compare Python and Rust for web development"


def run_once(command: list[str], run_dir: Path) -> tuple[float, RunRecord]:
    """One command in a fresh process: its wall time and the record it saved."""
    started = time.perf_counter()
    result = subprocess.run([*command, "--progress", "plain", "--run-dir", str(run_dir)], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return elapsed, RunRecord.model_validate_json((run_dir / "record.json").read_text())


def summary(record: RunRecord) -> str:
    completions = [agent.tokens.completion if agent.tokens else 0 for agent in record.agents]
    coordinator = record.coordinator.tokens if record.coordinator else None
    written = sum(completions) + (coordinator.completion if coordinator else 0)
    cut = sum(agent.repetition_cut for agent in record.agents)
    marked = sum(any(marker in agent.output for marker in TEMPLATE_MARKERS) for agent in record.agents)
    return f"{len(record.agents)} agents {record.status}, {written} tokens written, most {max(completions)} by one agent, {cut} cut, {marked} with markers"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4, help="the llama.cpp server's parallel slots")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"embedded": [], "openai": []}
    with serving(parallel=args.parallel, alias="gemma") as base_url, tempfile.TemporaryDirectory() as scratch:
        commands = {
            "embedded": ["metaagent", "run", QUERY],
            "openai": ["metaagent", "run", QUERY, "--llm", "openai", "--openai-base-url", base_url, "--model", "gemma"],
        }
        for name, command in commands.items():
            print(f"{name}: {' '.join(command)}")
        for round_number in range(1, args.rounds + 1):
            for name, command in commands.items():
                elapsed, record = run_once(command, Path(scratch) / f"{name}-{round_number}")
                times[name].append(elapsed)
                print(f"round {round_number} {name:8} {elapsed:6.1f} s  {summary(record)}", flush=True)
    embedded, openai = statistics.mean(times["embedded"]), statistics.mean(times["openai"])
    print(f"mean: embedded {embedded:.1f} s, openai {openai:.1f} s: openai / embedded = {openai / embedded:.2f}")


if __name__ == "__main__":
    main()
