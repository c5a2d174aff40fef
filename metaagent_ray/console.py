"""The terminal view of a run: the seed's lines, as events arrive."""

from __future__ import annotations

import sys
from typing import TextIO

from .events import AgentFinished, AgentStarted, Event, Notice, PlanningStarted, PlanReady, RoundStarted, RunFinished, SubPlanReady
from .paths import AgentPath
from .plan import ExecutionPlan


def layer_lines(plan: ExecutionPlan, layers: list[list[int]]) -> list[str]:
    """`🔀 Execution layers (parallel groups): N` and one line per layer, as in the seed."""
    lines = [f"🔀 Execution layers (parallel groups): {len(layers)}"]
    for number, layer in enumerate(layers):
        roles = [plan.agents[agent].role.value for agent in layer]
        lines.append(f"  Layer {number}: {len(layer)} agents in parallel - {roles}")
    return lines


def _indent(path: AgentPath) -> str:
    """Sub-plan agents ("2.1") are indented under their parent."""
    return "    " * path.depth


class ConsoleView:
    """Prints a run as it happens. `quiet` shows only warnings and the final output."""

    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False) -> None:
        self.stream = stream  # None: whatever sys.stdout is when a line is printed (the live view redirects it)
        self.quiet = quiet

    def _print(self, text: str = "") -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def __call__(self, event: Event) -> None:
        if isinstance(event, Notice):
            if event.warning or not self.quiet:
                self._print(event.text)
        elif self.quiet and not isinstance(event, RunFinished):
            return
        elif isinstance(event, PlanningStarted):
            self._print(f"🧭 Coordinator planning with {event.llm}...")
        elif isinstance(event, PlanReady):
            self._show_plan(event)
        elif isinstance(event, SubPlanReady):
            self._print(f"🔀 Agent {event.path} delegated its task to {len(event.plan.agents)} agents in {len(event.layers)} layers")
        elif isinstance(event, RoundStarted):
            self._print(f"🔁 Round {event.number}: joiner replanned: {event.reason}, {len(event.added)} new agents")
            for agent in event.added:
                spec = event.plan.agents[agent]
                self._print(f"  Agent {agent}: {spec.role.value} - {spec.task} (depends on {spec.depends_on or 'nothing'})")
        elif isinstance(event, AgentStarted):
            retry = f" (attempt {event.attempt})" if event.attempt > 1 else ""
            self._print(f"{_indent(event.path)}⚡ [PARALLEL] Agent {event.path}: {event.role}{retry}")
        elif isinstance(event, AgentFinished):
            agent = event.agent
            if agent.status == "ok":
                reused = " (reused)" if agent.reused else ""
                self._print(f"{_indent(agent.path)}✅ [PARALLEL] Agent {agent.path} completed: {agent.role}{reused}")
            else:
                self._print(f"{_indent(agent.path)}❌ [PARALLEL] Agent {agent.path} {agent.status}: {agent.role} - {agent.error}")
        elif isinstance(event, RunFinished):
            self._show_result(event)

    def _show_plan(self, event: PlanReady) -> None:
        for warning in event.plan.warnings:
            self._print(warning)
        if event.plan.description:
            self._print(f"📋 Plan: {event.plan.description}")
        for line in layer_lines(event.plan, event.layers):
            self._print(line)
        self._print()
        self._print(f"⚡ Executing {len(event.plan.agents)} agents on Ray, each as soon as its own dependencies finish...")

    def _show_result(self, event: RunFinished) -> None:
        record = event.record
        if not self.quiet:
            failed = record.failed_agents()
            span = record.makespan()
            reused = sum(agent.reused for agent in record.agents)
            summary = f"{len(record.agents) - len(failed)}/{len(record.agents)} agents ok"
            if span is not None:
                summary += f" in {span:.1f} s"
            if failed:
                summary += f"; not ok: {failed}"
            if reused:
                summary += f" ({reused} reused from the earlier run)"
            if len(record.rounds) > 1:
                summary += f"; {len(record.rounds)} rounds"
            self._print()
            self._print(f"🏁 {summary}")
            self._print()
            self._print("📝 Final output:")
        self._print(record.final_output)
