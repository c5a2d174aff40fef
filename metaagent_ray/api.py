"""The public Python API; the CLI is a thin layer over it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .coordinator import make_plan
from .errors import ConfigError, PlanError
from .events import EventHandler, Notice, ignore
from .llm import LLM, LLMConfig, create_llm
from .llm.auto import resolve_auto
from .plan import ExecutionPlan, explain
from .record import CoordinatorRecord, RunDirectory, RunRecord, save_record
from .runtime import RayOptions, RunInterrupted, execute_plan

DEFAULT_MAX_AGENTS = 64


def parse_plan(data: Any, *, source: str = "plan", max_agents: int = DEFAULT_MAX_AGENTS) -> ExecutionPlan:
    """Validate and clean a plan given as parsed JSON; errors name `source` and the problem."""
    try:
        plan = ExecutionPlan.model_validate(data)
    except ValidationError as error:
        raise PlanError(f"{source}: {explain(error)}") from None
    if len(plan.agents) > max_agents:
        raise PlanError(f"{source}: the plan has {len(plan.agents)} agents, more than --max-agents {max_agents}")
    return plan


def load_plan(path: Path | str, *, max_agents: int = DEFAULT_MAX_AGENTS) -> ExecutionPlan:
    """Read a plan file (the coordinator's JSON)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PlanError(f"{path}: cannot read the plan file ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise PlanError(f"{path}: not a text file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise PlanError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    return parse_plan(data, source=str(path), max_agents=max_agents)


class MetaAgent:
    """Plans and runs agent graphs on Ray.

    >>> agent = MetaAgent(llm="fake")
    >>> record = agent.execute(load_plan("examples/parallel_research.json"), "Compare Python, Rust and Go")
    """

    def __init__(
        self,
        llm: str | LLMConfig = "auto",
        *,
        model: str | None = None,
        llm_options: dict[str, Any] | None = None,
        slots: int | None = None,
        address: str | None = None,
        max_agents: int = DEFAULT_MAX_AGENTS,
        on_event: EventHandler = ignore,
        verbose: bool = False,
    ) -> None:
        self.llm_config = llm if isinstance(llm, LLMConfig) else LLMConfig(backend=llm, model=model, options=llm_options or {})

        self.ray_options = RayOptions(address=address, slots=slots, verbose=verbose)
        self.max_agents = max_agents
        self.on_event = on_event

    def _driver_llm(self) -> LLM:
        """The backend in the driver: bad options and unreachable servers fail here, before any agent runs."""
        if self.llm_config.backend == "auto":
            self.llm_config, why = resolve_auto(self.llm_config)
            self.on_event(Notice(f"🤖 LLM backend: {self.llm_config.backend}, because {why}"))
        llm = create_llm(self.llm_config)
        llm.check()
        return llm

    def plan(self, query: str) -> ExecutionPlan:
        """Ask the coordinator for a plan; nothing is executed. `plan.warnings` says if it fell back."""
        return self._plan(query)[0]

    def run(self, query: str, *, run_dir: Path | str | None = None, save: bool = True, record_path: Path | str | None = None) -> RunRecord:
        """Plan the query with the coordinator, then execute the plan; returns the run record."""
        plan, coordinator = self._plan(query)
        return self._execute(plan, query, coordinator, run_dir=run_dir, save=save, record_path=record_path)

    def _plan(self, query: str) -> tuple[ExecutionPlan, CoordinatorRecord]:
        if not query.strip():
            raise ConfigError("the query is empty")
        llm = self._driver_llm()
        self.on_event(Notice(f"🧭 Coordinator planning with {llm.describe()}..."))
        plan, coordinator = make_plan(query, llm, max_agents=self.max_agents)
        tries = "" if coordinator.attempts == 1 else f" after {coordinator.attempts} tries"
        self.on_event(Notice(f"🧭 Coordinator planned {len(plan.agents)} agents{tries}"))
        return plan, coordinator

    def execute(
        self,
        plan: ExecutionPlan | dict[str, Any],
        query: str = "",
        *,
        run_dir: Path | str | None = None,
        save: bool = True,
        record_path: Path | str | None = None,
    ) -> RunRecord:
        """Run a plan and return its record, kept in a run directory (unless `save` is False)."""
        if not isinstance(plan, ExecutionPlan):
            plan = parse_plan(plan, max_agents=self.max_agents)
        elif len(plan.agents) > self.max_agents:
            raise PlanError(f"the plan has {len(plan.agents)} agents, more than --max-agents {self.max_agents}")
        self._driver_llm()
        return self._execute(plan, query or plan.description, None, run_dir=run_dir, save=save, record_path=record_path)

    def _execute(
        self,
        plan: ExecutionPlan,
        query: str,
        coordinator: CoordinatorRecord | None,
        *,
        run_dir: Path | str | None,
        save: bool,
        record_path: Path | str | None,
    ) -> RunRecord:
        directory = RunDirectory.create(Path(run_dir) if run_dir else None, query or "plan") if save else None
        try:
            record = execute_plan(
                plan, query, self.llm_config, ray_options=self.ray_options, run_dir=directory, on_event=self.on_event,
                coordinator=coordinator,
            )
        except RunInterrupted as stop:
            if record_path is not None:
                save_record(Path(record_path), stop.record)
            raise
        if record_path is not None:
            save_record(Path(record_path), record)
        return record
