"""The public Python API; the CLI is a thin layer over it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .agents import AgentLimits
from .coordinator import make_plan
from .errors import ConfigError, PlanError
from .events import EventHandler, Notice, ignore
from .llm import LLM, LLMConfig, create_llm
from .llm.auto import resolve_auto
from .plan import ExecutionPlan, explain
from .pool import PoolHandle, PoolSpec, start_pool
from .record import AgentRecord, CoordinatorRecord, RunDirectory, RunRecord, save_record
from .runtime import RayOptions, RunInterrupted, RunLimits, announce_slots, ensure_ray, execute_plan
from .viz import write_pictures

DEFAULT_MAX_AGENTS = 64
INJECTED_FAULTS = "fail"  # the fake backend's fault-injection option: never stored for a resume


class RunSettings(BaseModel):
    """How to run: backend, resources and limits. Stored in the record, so `resume` can run alike."""

    model_config = ConfigDict(extra="forbid")

    llm: str = "auto"
    model: str | None = None
    llm_options: dict[str, Any] = Field(default_factory=dict)
    slots: int | None = Field(default=None, ge=1)
    address: str | None = None
    retries: int = Field(default=2, ge=0, le=10)
    agent_timeout: float | None = Field(default=300.0, gt=0)
    on_failure: Literal["continue", "stop"] = "continue"
    max_depth: int = Field(default=2, ge=0)
    max_agents: int = Field(default=DEFAULT_MAX_AGENTS, ge=1)
    max_total_agents: int = Field(default=200, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    pool: PoolSpec | None = None  # serve the model from this pool of server instances (GPU serving)

    def stored(self) -> dict[str, Any]:
        """What a resume may reuse: everything but injected faults."""
        options = {key: value for key, value in self.llm_options.items() if key != INJECTED_FAULTS}
        return self.model_copy(update={"llm_options": options}).model_dump()


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


def load_record(run_dir: Path | str) -> RunRecord:
    """The record a run left in its directory."""
    path = Path(run_dir) / "record.json"
    try:
        return RunRecord.model_validate_json(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{run_dir}: not a run directory ({path}: {error.strerror or error})") from None
    except ValidationError as error:
        raise ConfigError(f"{path}: not a valid run record ({explain(error)})") from None


class MetaAgent:
    """Plans and runs agent graphs on Ray.

    >>> agent = MetaAgent(llm="fake", slots=4)
    >>> record = agent.run("Compare Python, Rust, and Go for web development")
    """

    def __init__(self, llm: str = "auto", *, on_event: EventHandler = ignore, verbose: bool = False, **settings: Any) -> None:
        try:
            self.settings = RunSettings(llm=llm, **settings)
        except ValidationError as error:
            raise ConfigError(explain(error)) from None
        self.on_event = on_event
        self.verbose = verbose
        self._llm_config: LLMConfig | None = None
        self._pool: PoolHandle | None = None

    def __enter__(self) -> MetaAgent:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the LLM server pool, if this object started one (it serves all runs until then)."""
        if self._pool is not None:
            self._pool.stop()
            self._pool = None

    def _driver_llm(self) -> LLM:
        """The backend in the driver: bad options and unreachable servers fail here, before any agent runs."""
        if self._llm_config is None:
            self._llm_config = self._start_pool() if self.settings.pool else self._chosen_backend()
        llm = create_llm(self._llm_config)
        llm.check()
        if getattr(llm, "needs_ray", False):  # its model server is a Ray actor: Ray starts before the coordinator's call
            announce_slots(ensure_ray(self._ray_options(), self._llm_config), self._ray_options(), self.on_event)
        return llm

    def _chosen_backend(self) -> LLMConfig:
        config = LLMConfig(backend=self.settings.llm, model=self.settings.model, options=self.settings.llm_options)
        if config.backend == "auto":
            config, why = resolve_auto(config)
            self.on_event(Notice(f"🤖 LLM backend: {config.backend}, because {why}"))
        return config

    def _start_pool(self) -> LLMConfig:
        """Start the model servers as Ray actors, each pinned to its GPU share; agents go to a free one."""
        spec = self.settings.pool
        assert spec is not None
        ensure_ray(self._ray_options())
        self._pool = start_pool(spec.model_copy(update={"model": spec.model or self.settings.model}))
        self.on_event(Notice(f"🖥️ LLM pool: {self._pool.describe()}"))
        return self._pool.llm_config()

    def _ray_options(self) -> RayOptions:
        slots = self.settings.slots
        if slots is None and self.settings.pool is not None:
            slots = self.settings.pool.instances * self.settings.pool.requests_per_instance
        return RayOptions(address=self.settings.address, slots=slots, verbose=self.verbose)

    def plan(self, query: str) -> ExecutionPlan:
        """Ask the coordinator for a plan; nothing is executed. `plan.warnings` says if it fell back."""
        return self._plan(query)[0]

    def run(self, query: str, *, run_dir: Path | str | None = None, save: bool = True, record_path: Path | str | None = None) -> RunRecord:
        """Plan the query with the coordinator, then execute the plan; returns the run record."""
        plan, coordinator = self._plan(query)
        directory = self._directory(run_dir, query, save)
        return self._execute(plan, query, directory, record_path, coordinator=coordinator)

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
            plan = parse_plan(plan, max_agents=self.settings.max_agents)
        elif len(plan.agents) > self.settings.max_agents:
            raise PlanError(f"the plan has {len(plan.agents)} agents, more than --max-agents {self.settings.max_agents}")
        self._driver_llm()
        query = query or plan.description
        return self._execute(plan, query, self._directory(run_dir, query, save), record_path)

    @classmethod
    def resume(
        cls,
        run_dir: Path | str,
        *,
        on_event: EventHandler = ignore,
        verbose: bool = False,
        record_path: Path | str | None = None,
        **overrides: Any,
    ) -> RunRecord:
        """Re-run what failed, was skipped or never finished in `run_dir`, and everything downstream of it.

        The other agents' outputs are reused without calling the LLM. `overrides` replace the stored
        settings (backend, model, slots, ...); injected faults are never carried over.
        """
        previous = load_record(run_dir)
        settings = {**previous.settings, **overrides}
        if "llm" in overrides and overrides["llm"] != previous.settings.get("llm"):
            settings["llm_options"] = overrides.get("llm_options", {})
        rerun = previous.plan.descendants(set(previous.failed_agents()))
        reused = {agent.id: agent for agent in previous.agents if agent.id not in rerun}
        with cls(on_event=on_event, verbose=verbose, **settings) as meta:
            meta.on_event(Notice(f"♻️ Resuming {run_dir}: re-running agents {sorted(rerun)}, reusing {sorted(reused)}"))
            meta._driver_llm()
            return meta._execute(
                previous.plan, previous.query, RunDirectory(Path(run_dir)), record_path, coordinator=previous.coordinator, reused=reused
            )

    def _plan(self, query: str) -> tuple[ExecutionPlan, CoordinatorRecord]:
        if not query.strip():
            raise ConfigError("the query is empty")
        llm = self._driver_llm()
        self.on_event(Notice(f"🧭 Coordinator planning with {llm.describe()}..."))
        plan, coordinator = make_plan(query, llm, max_agents=self.settings.max_agents)
        tries = "" if coordinator.attempts == 1 else f" after {coordinator.attempts} tries"
        self.on_event(Notice(f"🧭 Coordinator planned {len(plan.agents)} agents{tries}"))
        return plan, coordinator

    @staticmethod
    def _directory(run_dir: Path | str | None, query: str, save: bool) -> RunDirectory | None:
        return RunDirectory.create(Path(run_dir) if run_dir else None, query or "plan") if save else None

    def _limits(self) -> RunLimits:
        settings = self.settings
        agent = AgentLimits(
            retries=settings.retries,
            call_timeout=settings.agent_timeout,
            max_tokens=settings.max_tokens,
            on_failure=settings.on_failure,
            max_depth=settings.max_depth,
            max_agents=settings.max_agents,
        )
        return RunLimits(agent=agent, max_total_agents=settings.max_total_agents)

    def _execute(
        self,
        plan: ExecutionPlan,
        query: str,
        directory: RunDirectory | None,
        record_path: Path | str | None,
        *,
        coordinator: CoordinatorRecord | None = None,
        reused: dict[int, AgentRecord] | None = None,
    ) -> RunRecord:
        assert self._llm_config is not None, "the backend is checked before a run"
        try:
            record = execute_plan(
                plan,
                query,
                self._llm_config,
                ray_options=self._ray_options(),
                limits=self._limits(),
                on_event=self.on_event,
                run_dir=directory,
                coordinator=coordinator,
                settings=self.settings.stored(),
                reused=reused,
            )
        except RunInterrupted as stop:
            if record_path is not None:
                save_record(Path(record_path), stop.record)
            raise
        if record_path is not None:
            save_record(Path(record_path), record)
        if directory is not None:
            write_pictures(record, directory.path)
        return record
