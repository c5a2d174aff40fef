"""The public Python API; the CLI is a thin layer over it (it imports only this module, its views and
the command's signal handling)."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import ValidationError

from .connect import RayConnection, RayOptions, cluster_address, ensure_ray, ray_started, shutdown_ray
from .coordinator import Coordinator, Joiner, planned_notice
from .errors import ConfigError, MetaAgentError, PlanError
from .events import COORDINATOR, EventHandler, Notice, PlanningStarted, RayStarting, TokenCounter, ignore
from .executors import POLICIES, Policy, stop_kept_executors
from .interrupts import exit_code, stop_signals_ignored
from .jobs import JobLog, JobOutcome, JobRequest, dashboard_address, follow_job, job_run_dir, print_run_archive, stop_job, submit_job
from .llm import LLM, LLMConfig, create_llm
from .llm.auto import resolve_auto
from .plan import ExecutionPlan, explain, too_many_agents
from .record import CoordinatorRecord, RunRecord, resume_choice, valid_text
from .resources import SlotPlan, default_slots
from .run_directory import RunDirectory, RunFiles, nearest_existing, new_run_files, save_record, write_problem
from .runtime import RunStop, execute_plan, plan_and_execute, share_slots, write_ray_timeline
from .serving import ServeLLMSpec
from .settings import RunSettings
from .stops import PlanningInterrupted, RunStopped
from .tracing import exporting
from .version import __version__

if TYPE_CHECKING:  # Ray Serve and FastAPI are imported by runs that use them (the serve extra)
    from .serve_llm import ServedLLM

__all__ = [  # this module's own names, and those it passes on from the rooms below it
    "DEFAULT_MAX_AGENTS",
    "ConfigError",
    "ExecutionPlan",
    "JobLog",
    "JobOutcome",
    "JobRequest",
    "MetaAgent",
    "MetaAgentError",
    "POLICIES",
    "PlanError",
    "Policy",
    "RunRecord",
    "RunSettings",
    "RunStop",
    "RunStopped",
    "ServeLLMSpec",
    "SlotPlan",
    "__version__",
    "check_output_file",
    "copy_record",
    "dashboard_address",
    "follow_job",
    "job_run_dir",
    "load_plan",
    "load_record",
    "node_slots",
    "parse_plan",
    "plan_json",
    "print_run_archive",
    "resume_summary",
    "save_plan",
    "share_slots",
    "stop_job",
    "submit_job",
    "write_pictures",
    "write_report",
]

DEFAULT_MAX_AGENTS = RunSettings.default("max_agents")


def parse_plan(data: Any, *, source: str = "plan", max_agents: int = DEFAULT_MAX_AGENTS) -> ExecutionPlan:
    """Validate and clean a plan given as parsed JSON; errors name `source` and the problem."""
    try:
        plan = ExecutionPlan.model_validate(data)
    except ValidationError as error:
        raise PlanError(f"{source}: {explain(error)}") from None
    if (too_many := too_many_agents(len(plan.agents), max_agents)) is not None:
        raise PlanError(f"{source}: {too_many}")
    return plan


MAX_INPUT_FILE_BYTES = 256 * 1024**2  # a plan or record larger than this is not one (5,000 agents take about 1 MB)


def read_input_file(path: Path) -> str:
    """The text of a plan or record file; OSError or ValueError (with a reason a user can act on) when it is none.

    Only regular files: /dev/zero would be read until memory ran out, and a FIFO no one writes
    would wait forever.
    """
    if path.exists() and not path.is_file():
        raise ValueError("a directory, not a file" if path.is_dir() else "not a regular file (a device, FIFO or socket)")
    with path.open("rb") as handle:
        data = handle.read(MAX_INPUT_FILE_BYTES + 1)
    if len(data) > MAX_INPUT_FILE_BYTES:
        raise ValueError(f"larger than {MAX_INPUT_FILE_BYTES // 1024**2} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: a repeated key would silently lose all but its last value."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"the key {key!r} appears twice in one object")
        data[key] = value
    return data


def load_plan(path: Path | str, *, max_agents: int = DEFAULT_MAX_AGENTS) -> ExecutionPlan:
    """Read a plan file (the coordinator's JSON)."""
    path = Path(path)
    try:
        text = read_input_file(path)
    except OSError as error:
        raise PlanError(f"{path}: cannot read the plan file ({error.strerror or error})") from None
    except ValueError as error:
        raise PlanError(f"{path}: not a plan file ({error})") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise PlanError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    except ValueError as error:
        raise PlanError(f"{path}: {error}") from None
    except RecursionError:
        raise PlanError(f"{path}: not a plan (its JSON nests too deeply)") from None
    return parse_plan(data, source=str(path), max_agents=max_agents)


def plan_json(plan: ExecutionPlan) -> str:
    """A plan as the JSON `load_plan` and `metaagent exec` read."""
    return plan.model_dump_json(indent=2, exclude={"depth"})


def save_plan(plan: ExecutionPlan, path: Path | str) -> None:
    """Write a plan file (`plan_json`); missing directories are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan_json(plan) + "\n", encoding="utf-8")


def node_slots(llm: str = "auto", model: str | None = None, options: dict[str, Any] | None = None) -> SlotPlan:
    """This node's LLM slots for a backend (RAM, cores, GPUs and the model's footprint), with the reasoning."""
    return default_slots(LLMConfig(backend=llm, model=model, options=options or {}))


def check_output_file(path: Path, option: str) -> None:
    """A file a run will write at its end can be written (missing directories are made then): checked
    before anything runs."""
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a directory; give a file name")
    ancestor = nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise ConfigError(f"{option} {path}: {ancestor} is a file, not a directory")
    problem = write_problem(ancestor)
    if problem is not None:
        raise ConfigError(
            f"{option} {path}: cannot write in {ancestor} ({(problem.strerror or str(problem)).lower()}); give a writable place"
        )


def load_record(run_dir: Path | str) -> RunRecord:
    """The record a run left in its directory."""
    path = RunDirectory(Path(run_dir)).record_file
    try:
        return RunRecord.model_validate_json(read_input_file(path))
    except OSError as error:
        raise ConfigError(f"{run_dir}: not a run directory ({path}: {error.strerror or error})") from None
    except ValidationError as error:
        raise ConfigError(f"{path}: not a valid run record ({explain(error)})") from None
    except ValueError as error:
        raise ConfigError(f"{path}: not a valid run record ({error})") from None


def write_pictures(run_dir: Path | str) -> list[Path]:
    """Draw a run again in its directory: graph.svg, timeline.svg and graph.mmd; returns their paths."""
    return RunDirectory(Path(run_dir)).write_pictures(load_record(run_dir))


def write_report(run_dir: Path | str) -> Path:
    """Write a run's report.html again in its directory; returns its path."""
    return RunDirectory(Path(run_dir)).write_report(load_record(run_dir))


def copy_record(run_dir: Path | str, path: Path | str) -> None:
    """Copy a run's record.json to `path` (as `--record` does)."""
    shutil.copyfile(RunDirectory(Path(run_dir)).record_file, path)


def resume_summary(previous: RunRecord) -> str:
    """Which agents a resume runs again, which sub-plans it continues, and what it reuses."""
    reuse, resume = resume_choice(previous.plan, previous.agents, previous.settled_agents())
    fresh = sorted(set(range(len(previous.agents))) - reuse - resume)
    parts = [f"re-running agents {fresh}"]
    if resume:
        parts.append(f"continuing the sub-plans of agents {sorted(resume)}")
    return ", ".join([*parts, f"reusing {sorted(reuse)}"])


def _check_outputs(run_dir: Path | str | None, record_path: Path | str | None, ray_timeline: Path | str | None, *, save: bool) -> None:
    """Paths a run writes are usable (a new run's directory, or ./runs, among them when it is saved),
    checked before Ray starts, the coordinator or any agent runs."""
    if run_dir is not None:
        RunDirectory.check_new(Path(run_dir))
    if save:
        RunDirectory.check_writable(Path(run_dir) if run_dir else None, existing=False)
    for path, option in ((record_path, "--record"), (ray_timeline, "--ray-timeline")):
        if path is not None:
            check_output_file(Path(path), option)


class MetaAgent:
    """Plans and runs agent graphs on Ray.

    >>> agent = MetaAgent(llm="fake", slots=4)
    >>> record = agent.run("Compare Python, Rust, and Go for web development")
    """

    def __init__(
        self,
        llm: str = "auto",
        *,
        on_event: EventHandler = ignore,
        verbose: bool = False,
        stream: bool = False,
        stream_plan: bool = True,
        stop: RunStop | None = None,
        **settings: Any,
    ) -> None:
        """`stream`: answers stream to `on_event` as `TokensArrived` while agents and the coordinator write them.
        `stream_plan`: `run` starts each agent as soon as the coordinator's streamed plan makes it safe,
        instead of after the whole plan. `stop`: called from another thread, it ends the run under way as
        Ctrl-C does (status interrupted, resumable)."""
        try:
            self.settings = RunSettings(llm=llm, **settings)
        except ValidationError as error:
            raise ConfigError(explain(error)) from None
        self.on_event = on_event
        self.verbose = verbose
        self.stream = stream
        self.stream_plan = stream_plan
        self.stop = stop
        self._trace = exporting(self.settings.otel)  # read once: `--otel` without the extra fails here, before anything runs
        self._llm_config: LLMConfig | None = None
        self._connection: RayConnection | None = None
        self._served: ServedLLM | None = None  # the Ray Serve application, once deployed or attached to

    def __enter__(self) -> MetaAgent:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete the Ray Serve LLM application, if this object deployed one (it serves all runs until then),
        and stop the Ray instance this process started, so none of its processes outlive the caller."""
        with stop_signals_ignored():  # a second Ctrl-C cannot leave a replica or Ray's processes behind
            if self._served is not None:
                self._served.stop()
                self._served = None
            stop_kept_executors()
            shutdown_ray()

    def connect(self) -> None:
        """Connect to Ray now (embedded Ray gets this backend's slots), as a run would first: for `metaagent serve`."""
        self._llm()
        self._connect()

    def _driver_llm(self) -> LLM:
        """The backend in the driver: bad options and unreachable servers fail here, before any agent runs."""
        llm = create_llm(self._llm())
        llm.check()
        if llm.needs_ray:  # its model server is a Ray actor: Ray starts before the coordinator's call
            self._connect()
        return llm

    def _llm(self) -> LLMConfig:
        if self._llm_config is None:
            self._llm_config = self._serve_llm() if self.settings.serve_llm else self._chosen_backend()
        return self._llm_config

    def _connect(self) -> None:
        """Connect to Ray (bounded), check `slots` fit, and say where the run runs: before anything is written."""
        if self._connection is None:
            if not ray_started():
                self.on_event(RayStarting(address=cluster_address(self._ray_options())))
            # Embedded Ray counts this machine's slots from the backend's footprint; Serve's slots are its replicas'.
            self._connection = ensure_ray(self._ray_options(), None if self.settings.serve_llm else self._llm())
            self.on_event(Notice(self._connection.describe()))
        self._connection.check_slots(self.settings.slots)

    def _chosen_backend(self) -> LLMConfig:
        config = LLMConfig(backend=self.settings.llm, model=self.settings.model, options=self.settings.llm_options)
        if config.backend == "auto":
            config, why = resolve_auto(config)
            self.on_event(Notice(f"🤖 LLM backend: {config.backend}, because {why}"))
        return config

    def _serve_llm(self) -> LLMConfig:
        """Deploy (or attach to) the Ray Serve LLM application; agents call it through the `openai` backend."""
        from .serve_llm import serve_llm  # Ray Serve and FastAPI: only runs that serve their model through Serve need them

        spec = self.settings.serve_llm
        assert spec is not None
        if self.settings.llm not in ("auto", "openai"):
            raise ConfigError(f"--serve-llm runs agents through the openai backend; leave out --llm {self.settings.llm}")
        self._connect()
        self._served = serve_llm(spec.model_copy(update={"model": spec.model or self.settings.model}))
        self.on_event(Notice(f"🖥️ LLM serving: {self._served.describe()}"))
        return self._served.llm_config(self.settings.llm_options)

    def _ray_options(self) -> RayOptions:
        slots = self.settings.slots
        if slots is None and self.settings.serve_llm is not None:  # the replicas' capacity: once running, as counted
            slots = self._served.slots if self._served is not None else self.settings.serve_llm.capacity
        return RayOptions(address=self.settings.address, slots=slots, verbose=self.verbose)

    def plan(self, query: str) -> ExecutionPlan:
        """Ask the coordinator for a plan; nothing is executed. `plan.warnings` says if it fell back."""
        return self._plan(query)

    def run(
        self,
        query: str,
        *,
        run_dir: Path | str | None = None,
        save: bool = True,
        record_path: Path | str | None = None,
        ray_timeline: Path | str | None = None,
    ) -> RunRecord:
        """Plan the query with the coordinator and execute the plan; returns the run record.

        With `stream_plan` (the default) agents start while the coordinator still writes the plan.
        `ray_timeline` receives Ray's own chrome trace of the run (`ray.timeline`).
        """
        _check_outputs(run_dir, record_path, ray_timeline, save=save)
        query = valid_text(query)
        llm = self._planning(query)
        return self._run_and_write_extras(
            lambda: plan_and_execute(
                query,
                self._coordinator(query, llm),
                self._ready_llm(),
                max_agents=self.settings.max_agents,
                ray_options=self._ray_options(),
                limits=self.settings.limits(),
                on_event=self.on_event,
                run_dir=partial(new_run_files, run_dir, query, save),
                settings=self.settings.stored(),
                stream=self.stream,
                stream_plan=self.stream_plan,
                planning=PlanningStarted(llm=llm.describe()),
                trace=self._trace,
                joiner=self._joiner(llm),
                stop=self.stop,
            ),
            record_path,
            ray_timeline,
        )

    def execute(
        self,
        plan: ExecutionPlan | dict[str, Any],
        query: str = "",
        *,
        run_dir: Path | str | None = None,
        save: bool = True,
        record_path: Path | str | None = None,
        ray_timeline: Path | str | None = None,
    ) -> RunRecord:
        """Run a plan and return its record, kept in a run directory (unless `save` is False)."""
        if not isinstance(plan, ExecutionPlan):
            plan = parse_plan(plan, max_agents=self.settings.max_agents)
        elif (too_many := too_many_agents(len(plan.agents), self.settings.max_agents)) is not None:
            raise PlanError(too_many)
        _check_outputs(run_dir, record_path, ray_timeline, save=save)
        llm = self._driver_llm()
        self._connect()
        query = valid_text(query or plan.description)
        directory = new_run_files(run_dir, query, save)
        with directory.locked():
            return self._execute(plan, query, directory, record_path, joiner=self._joiner(llm), ray_timeline=ray_timeline)

    @classmethod
    def resume(
        cls,
        run_dir: Path | str,
        *,
        on_event: EventHandler = ignore,
        verbose: bool = False,
        stream: bool = False,
        record_path: Path | str | None = None,
        ray_timeline: Path | str | None = None,
        **overrides: Any,
    ) -> RunRecord:
        """Re-run what failed, was skipped or never finished in `run_dir`, and everything downstream of it.

        The other agents' outputs are reused without calling the LLM. `overrides` replace the stored
        settings (backend, model, slots, ...); injected faults are never carried over.
        """
        _check_outputs(None, record_path, ray_timeline, save=False)
        load_record(run_dir)  # a run directory, before its lock is taken
        directory = RunDirectory.earlier(Path(run_dir))
        with directory.locked():
            previous = load_record(run_dir)  # as it is now that no one else writes it
            settings = {**previous.settings, **overrides}
            if "llm" in overrides and overrides["llm"] != previous.settings.get("llm"):
                settings["llm_options"] = overrides.get("llm_options", {})
            with cls(on_event=on_event, verbose=verbose, stream=stream, **settings) as meta:
                llm = meta._driver_llm()
                meta._connect()
                meta.on_event(Notice(f"♻️ Resuming {run_dir}: {resume_summary(previous)}"))
                return meta._execute(
                    previous.plan,
                    previous.query,
                    directory,
                    record_path,
                    coordinator=previous.coordinator,
                    earlier=previous,
                    joiner=meta._joiner(llm),
                    ray_timeline=ray_timeline,
                )

    def _plan(self, query: str) -> ExecutionPlan:
        """The coordinator's whole plan, without Ray (`plan`: nothing runs)."""
        llm = self._planning(query, connect=False)
        on_text = TokenCounter(COORDINATOR, self.on_event) if self.stream else None
        try:  # from the line that says the coordinator plans, a stop signal is one that interrupted the planning
            self.on_event(PlanningStarted(llm=llm.describe()))
            plan, coordinator = self._coordinator(query, llm)(on_text, None)
        except KeyboardInterrupt as interrupt:
            raise PlanningInterrupted(exit_code(interrupt)) from None
        self.on_event(planned_notice(plan, coordinator))
        return plan

    def _coordinator(self, query: str, llm: LLM) -> Coordinator:
        """The coordinator's call for `query` with this agent's settings: one for `plan` and for `run`'s planning route."""
        settings = self.settings
        return Coordinator(query, llm, settings.max_agents, settings.answer_tokens, settings.agent_timeout)

    def _joiner(self, llm: LLM) -> Joiner | None:
        """The joiner that judges each round with this agent's settings (`replan`); None when it may not replan."""
        settings = self.settings
        if not settings.replan:
            return None
        return Joiner(llm, settings.replan, settings.max_agents, settings.max_total_agents, settings.answer_tokens, settings.agent_timeout)

    def _planning(self, query: str, *, connect: bool = True) -> LLM:
        """Checks before the coordinator's call (the query, the backend, Ray when `connect`, so a run whose
        cluster is unreachable stops before the LLM plans); the coordinator's LLM. The caller says when the
        planning starts (`PlanningStarted`)."""
        if not query.strip():
            raise ConfigError("the query is empty")
        llm = self._driver_llm()
        if connect:
            self._connect()
        return llm

    def _ready_llm(self) -> LLMConfig:
        assert self._llm_config is not None, "the backend is checked before a run"
        return self._llm_config

    def _execute(
        self,
        plan: ExecutionPlan,
        query: str,
        directory: RunFiles,
        record_path: Path | str | None,
        *,
        coordinator: CoordinatorRecord | None = None,
        earlier: RunRecord | None = None,
        joiner: Joiner | None = None,
        ray_timeline: Path | str | None = None,
    ) -> RunRecord:
        return self._run_and_write_extras(
            lambda: execute_plan(
                plan,
                query,
                self._ready_llm(),
                ray_options=self._ray_options(),
                limits=self.settings.limits(),
                on_event=self.on_event,
                run_dir=directory,
                coordinator=coordinator,
                settings=self.settings.stored(),
                earlier=earlier,
                stream=self.stream,
                trace=self._trace,
                joiner=joiner,
                stop=self.stop,
            ),
            record_path,
            ray_timeline,
        )

    @staticmethod
    def _run_and_write_extras(run: Callable[[], RunRecord], record_path: Path | str | None, ray_timeline: Path | str | None) -> RunRecord:
        """Run (the run directory keeps its own files), then write the files asked for outside it: the
        record's copy (`--record`) however the run ended, and Ray's timeline when it finished."""
        try:
            record = run()
        except RunStopped as stop:
            _copy_record(stop.record, record_path)
            raise
        with stop_signals_ignored():  # the run has ended: what it did is kept whole
            _copy_record(record, record_path)
            if ray_timeline is not None:
                write_ray_timeline(Path(ray_timeline))
        return record


def _copy_record(record: RunRecord, record_path: Path | str | None) -> None:
    """The record's extra copy (`--record`), when one was asked for."""
    if record_path is not None:
        try:
            save_record(Path(record_path), record)
        except OSError as error:
            raise ConfigError(f"--record {record_path}: cannot write it ({(error.strerror or str(error)).lower()})") from None
