"""What `metaagent` prints: the view of a run it chooses, and the lines its commands end with.

A run's events go to the plain lines (console.py) or the live view (live.py); everything else the
command says (where a run is kept, a plan, a node's slots, a job's progress) is here, so cli.py only
parses options, calls the API and picks the view.
"""

from __future__ import annotations

import shlex
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console

from .console import ConsoleView, layer_lines
from .errors import ConfigError
from .live import LiveView
from .plan import ExecutionPlan
from .record import RunRecord
from .resources import SLOT_RESOURCE, SlotPlan, node_resources_json

PROGRESS_MODES = ("auto", "live", "plain")
View = ConsoleView | LiveView


def choose_view(progress: str, *, quiet: bool = False, stream: TextIO | None = None) -> View:
    """The live view in a terminal (or with `progress` "live"), else the seed's plain lines on `stream` (default stdout)."""
    if progress not in PROGRESS_MODES:
        raise ConfigError(f"--progress {progress}: use one of {', '.join(PROGRESS_MODES)}")
    if stream is None and not quiet and progress != "plain":
        if progress == "live":
            return LiveView(Console(force_terminal=True))
        console = Console()
        if console.is_terminal and not console.is_dumb_terminal:
            return LiveView(console)
    return ConsoleView(stream, quiet=quiet)


def watching(view: View) -> AbstractContextManager[Any]:
    """The live view draws until the block ends, however it ends; plain lines need nothing."""
    return view if isinstance(view, LiveView) else nullcontext()


def is_live(view: View) -> bool:
    """Whether the view draws answers as they stream (the live view does)."""
    return isinstance(view, LiveView)


def say_where_run_is(record: RunRecord) -> None:
    """Where the run is kept, and how to re-run what did not finish (when something did not)."""
    if record.run_dir:
        print(f"\n💾 Run saved in {record.run_dir}", file=sys.stderr)
        if record.status != "ok":
            print(f"↩️ To re-run what did not finish: metaagent resume {shlex.quote(record.run_dir)}", file=sys.stderr)


def show_plan(plan: ExecutionPlan, text: str, *, saved_to: Path | None, query: str) -> None:
    """A plan's warnings, its JSON `text` (unless it was saved to a file) and its layers."""
    for warning in plan.warnings:
        print(warning, file=sys.stderr)
    if saved_to is None:
        print(text)
    for line in layer_lines(plan, plan.get_execution_layers()):
        print(line, file=sys.stderr if saved_to is None else sys.stdout)
    if saved_to is not None:
        print(f"💾 Plan saved to {saved_to}; run it with: metaagent exec {saved_to} --query {shlex.quote(query)}")


def show_slot_plan(plan: SlotPlan) -> None:
    """A node's LLM slots: the reasoning, the count, and the `ray start` line for a cluster node."""
    print("\n".join(plan.reasons))
    print(f"\n{SLOT_RESOURCE} = {plan.slots}: Ray started here gets this many LLM slots (--slots N overrides).")
    print(f"On a cluster node: ray start --resources '{node_resources_json(plan)}'")


def show_node_resources(plan: SlotPlan) -> None:
    """Only the JSON for `ray start --resources '<json>'` on a cluster node."""
    print(node_resources_json(plan))


def say(line: str) -> None:
    """A line about the command's progress (a job submitted, stopped, brought back), on stderr."""
    print(line, file=sys.stderr, flush=True)
