"""The run record, a public JSON contract, and the run directory that keeps it on disk.

`record.json` is rewritten atomically as agents finish, sub-plan agents included, at most once a
second (the runtime's checkpoints) and once at the end, so a run that stops for any reason leaves
behind everything that had finished (one killed outright, all but its last second). A run
directory belongs to one run: a new run refuses a directory that holds files, and an OS file lock
keeps a second run or resume from writing it at the same time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shlex
import tempfile
import time
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, Field, model_validator

from .errors import ConfigError, MetaAgentError
from .llm import Usage
from .paths import ROOT, AgentPath
from .plan import ExecutionPlan
from .version import __version__

RECORD_VERSION = 1
RUNS = Path("runs")  # where runs are kept unless --run-dir says otherwise
RUN_DIR_MODE = 0o755  # a run directory and the directories made for it: others may read them, never write them
# "delegated": the agent's task went to a sub-plan still running; the runtime ends it as ok or failed.
AgentState = Literal["pending", "ok", "failed", "skipped", "delegated"]
RunState = Literal["running", "ok", "failed", "interrupted"]


class FailureKind(str, Enum):
    """Why an agent did not succeed, for the runtime and other tools to read (the error says it in words)."""

    LLM = "llm"  # its LLM call failed for good (after the retries a transient error gets)
    BACKEND = "backend"  # the backend raised something other than an LLM error
    TIMED_OUT = "timed_out"  # no result within its deadline: abandoned, its call may still run
    EXECUTOR_LOST = "executor_lost"  # its executor died at every try
    NO_NODE = "no_node"  # no node with LLM slots for the run is left
    RAY = "ray"  # its Ray task failed
    SUPERVISION = "supervision"  # the hub's supervision of it failed
    SUB_PLAN = "sub_plan"  # it delegated, and its sub-plan's final agent did not succeed
    INPUT_MISSING = "input_missing"  # skipped: an input failed, under --on-failure stop



class AgentRecord(BaseModel):
    """One agent of a run: its spec after cleaning, what happened, where and when."""

    id: int
    path: AgentPath  # "2" at the top level, "2.1" for agent 1 of agent 2's sub-plan
    role: str
    task: str
    depends_on: list[int]
    layer: int
    status: AgentState = "pending"
    submitted_at: float | None = None  # epoch seconds: when the runtime handed the agent to Ray
    started_at: float | None = None  # epoch seconds, taken inside the task around the LLM call
    finished_at: float | None = None
    inputs_from: list[int] = Field(default_factory=list)
    output: str = ""
    error: str | None = None
    failure: FailureKind | None = None  # set with `error`
    node: str | None = None
    attempts: int = 0
    tokens: Usage | None = None  # when the backend reports them
    llm_ms: float | None = None
    output_file: str | None = None  # relative to the run directory
    reused: bool = False  # taken from the run being resumed, without an LLM call
    repetition_cut: bool = False  # the answer repeated a sentence or paragraph and was cut before the repeat
    finish_reason: str | None = None  # why the model's answer ended, as its server said: "stop", or "length" (its token budget)
    sub_run: SubRunRecord | None = None  # the sub-plan this agent delegated its task to
    # What the run should warn about this agent (its sub-plan fell back, a budget was reached): carried to
    # the hub, which publishes each as a warning event for the run's `warnings`; not saved here.
    warnings: list[str] = Field(default_factory=list, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _path_of_a_top_level_agent(cls, data: Any) -> Any:
        """A record without a path (written before paths existed, or made by hand) is a top-level agent's."""
        if isinstance(data, dict) and not data.get("path") and "id" in data:
            return {**data, "path": str(data["id"])}
        return data


class SubRunRecord(BaseModel):
    """An agent's delegated task: the sub-plan the coordinator made for it, and its agents."""

    query: str
    plan: ExecutionPlan
    layers: list[list[int]]
    warnings: list[str] = Field(default_factory=list)
    agents: list[AgentRecord]

    @model_validator(mode="after")
    def _agents_match_plan(self) -> SubRunRecord:
        _check_agents_match(self.plan, self.agents)
        return self

    @classmethod
    def start(cls, path: AgentPath, query: str, plan: ExecutionPlan) -> SubRunRecord:
        """The record of the sub-plan agent `path` delegated to, about to run: every agent pending."""
        return cls(
            query=query,
            plan=plan,
            layers=plan.get_execution_layers(),
            warnings=plan.warnings,
            agents=agent_records(plan, parent=path),
        )


def _check_agents_match(plan: ExecutionPlan, agents: list[AgentRecord]) -> None:
    """A record's agents are the plan's, in order: resume and the pictures index them by id."""
    if len(agents) != len(plan.agents):
        raise ValueError(f"the record has {len(agents)} agents but its plan has {len(plan.agents)}")
    for position, agent in enumerate(agents):
        if agent.id != position:
            raise ValueError(f"agents[{position}] has id {agent.id}, which does not match its position")


class CoordinatorRecord(BaseModel):
    """How the plan was made, when a coordinator LLM made it."""

    attempts: int
    fallback: bool = False
    errors: list[str] = Field(default_factory=list)  # why earlier answers were rejected
    llm_ms: float | None = None
    tokens: Usage | None = None
    started_at: float | None = None  # epoch seconds around the coordinator's LLM calls
    finished_at: float | None = None
    streamed: bool = False  # agents started while the plan was still being written
    started_early: list[int] = Field(default_factory=list)  # the agents that did
    set_aside: str | None = None  # why what they did was cancelled and not kept, when it was


class RecordedLLM(BaseModel):
    """The backend a run used, as the record keeps it: never its options, which may hold secrets."""

    backend: str = ""  # "" in records that did not say
    model: str | None = None


class RunRecord(BaseModel):
    """Everything a run did. Other tools read this: add fields, never rename or remove them."""

    version: int = RECORD_VERSION
    metaagent_version: str | None = None  # the metaagent-ray release that last ran it (None in records before 0.1.0)
    query: str
    plan: ExecutionPlan
    layers: list[list[int]]
    warnings: list[str] = Field(default_factory=list)
    final_output: str = ""
    status: RunState = "running"
    started_at: float = Field(default_factory=time.time)
    finished_at: float | None = None
    llm: RecordedLLM = Field(default_factory=RecordedLLM)
    # What `resume` reuses (RunSettings.stored()): kept as written, and validated as RunSettings when a resume
    # uses it, so a record written by another release still opens.
    settings: dict[str, Any] = Field(default_factory=dict)
    slots: int | None = None
    run_dir: str | None = None
    ray_started_at: float | None = None  # epoch seconds: the run started or connected to Ray ...
    ray_ready_at: float | None = None  # ... and Ray was ready (both None when Ray was already up)
    coordinator: CoordinatorRecord | None = None
    agents: list[AgentRecord]

    @model_validator(mode="after")
    def _agents_match_plan(self) -> RunRecord:
        _check_agents_match(self.plan, self.agents)
        return self

    @classmethod
    def start(cls, plan: ExecutionPlan, query: str, **fields: Any) -> RunRecord:
        return cls(
            query=query,
            plan=plan,
            layers=plan.get_execution_layers(),
            warnings=plan.warnings,
            agents=agent_records(plan),
            metaagent_version=__version__,
            **fields,
        )

    def compose_final_output(self) -> str:
        return compose_final_output(self.plan, self.agents)

    def failed_agents(self) -> list[int]:
        return [agent.id for agent in self.agents if agent.status != "ok"]

    def makespan(self) -> float | None:
        """Seconds from the first start to the last finish among the agents this run ran (not reused)."""
        ran = [agent for agent in self.agents if not agent.reused]
        starts = [agent.started_at for agent in ran if agent.started_at is not None]
        ends = [agent.finished_at for agent in ran if agent.finished_at is not None]
        return max(ends) - min(starts) if starts and ends else None

    def find(self, path: AgentPath) -> tuple[list[AgentRecord], int]:
        """The list holding the agent at `path` ("2.1" is agent 1 of agent 2's sub-run) and its index there."""
        agents = self.agents
        for step in path.parent.steps:
            sub_run = agents[step].sub_run
            if sub_run is None:
                raise KeyError(str(path))
            agents = sub_run.agents
        return agents, path.index


def compose_final_output(plan: ExecutionPlan, agents: list[AgentRecord]) -> str:
    """The sink agent's output; with several sinks, each under a heading in index order."""
    sinks = [agents[index] for index in plan.sinks()]
    if len(sinks) == 1:
        return _output_or_reason(sinks[0])
    return "\n\n".join(f"## Agent {agent.id} ({agent.role}): {agent.task}\n\n{_output_or_reason(agent)}" for agent in sinks)


def walk_agents(agents: list[AgentRecord]) -> Iterator[AgentRecord]:
    """Every agent, each followed by the agents of its sub-run (recursively)."""
    for agent in agents:
        yield agent
        if agent.sub_run is not None:
            yield from walk_agents(agent.sub_run.agents)


def ready_at(agent: AgentRecord, siblings: list[AgentRecord]) -> float | None:
    """When the agent could start: submitted to Ray and every dependency finished (None when unknown)."""
    times = [agent.submitted_at, *(siblings[dep].finished_at for dep in agent.depends_on)]
    known = [moment for moment in times if moment is not None]
    return max(known) if agent.submitted_at is not None else None


def agent_records(plan: ExecutionPlan, parent: AgentPath = ROOT) -> list[AgentRecord]:
    """A pending record for every agent of a plan (`parent` is the delegating agent's path for a sub-plan)."""
    layer_of = plan.layer_of()
    return [
        AgentRecord(
            id=index, path=parent.child(index), role=spec.role.value, task=spec.task, depends_on=spec.depends_on, layer=layer_of[index]
        )
        for index, spec in enumerate(plan.agents)
    ]


def kept_agents(plan: ExecutionPlan, agents: list[AgentRecord]) -> dict[int, AgentRecord]:
    """What a resume hands the runtime of these agents (see `resume_choice`): reused ones as `ok` and
    `reused`, the ones whose sub-plan continues as `delegated`, with their sub-plan's agents as they were."""
    reuse, resume = resume_choice(plan, agents)
    kept = {index: agents[index].model_copy(update={"reused": True}, deep=True) for index in reuse}
    kept.update({index: agents[index].model_copy(update={"status": "delegated"}, deep=True) for index in resume})
    return kept


def resume_choice(plan: ExecutionPlan, agents: list[AgentRecord]) -> tuple[set[int], set[int]]:
    """What a resume keeps of a plan's agents: those it reuses as they are, and the delegated agents
    whose unfinished sub-plan it continues (they did not finish, but none of their inputs changes).
    Every other agent runs again: it did not finish, or something upstream of it runs again."""
    rerun = plan.descendants({agent.id for agent in agents if agent.status != "ok"})
    reuse = {agent.id for agent in agents if agent.id not in rerun}
    resume = {agent.id for agent in agents if agent.id in rerun and agent.sub_run is not None and not set(agent.depends_on) & rerun}
    return reuse, resume


def _output_or_reason(agent: AgentRecord) -> str:
    if agent.status == "ok":
        return agent.output
    return f"(agent {agent.id} {agent.status}: {agent.error or 'no output'})"


def valid_text(text: str) -> str:
    """`text` with what UTF-8 cannot hold replaced by U+FFFD: a lone surrogate, such as half an emoji
    that a backend's JSON escaped alone ("\\ud83d"), would otherwise fail every write of the run."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def slugify(text: str, limit: int = 40) -> str:
    """A short, safe file-name fragment of any text (LLM output never becomes a path as is)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "run"


def run_dir_name(slug_source: str) -> str:
    """A run directory's default name: `<UTC time>-<slug>`."""
    return f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{slugify(slug_source)}"


class RunDirectoryError(MetaAgentError):
    """A run directory cannot be written (read-only, full, not permitted); the line says what to do."""


def cannot_write(directory: Path, error: OSError, *, existing: bool) -> RunDirectoryError:
    """The line for a run directory that refused a write, with what to do: `existing` is a run being
    resumed (or drawn); a new run whose record is already there can be resumed once writes work again."""
    reason = (error.strerror or type(error).__name__).lower()
    where = shlex.quote(str(directory))
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    if existing:
        fix = "free some space there" if full else "make it writable, or copy it to a writable place and use the copy"
    elif (directory / "record.json").is_file():
        fix = ("free some space there" if full else "make it writable") + f", then: metaagent resume {where}"
    else:
        fix = "free some space there, or pass --run-dir to another file system" if full else "pass --run-dir to a writable place"
    return RunDirectoryError(f"cannot write the run directory {where}: {reason}; {fix}")


def write_problem(directory: Path) -> OSError | None:
    """Why a file cannot be written in `directory` now (None: it can), found by writing one: the
    permission bits alone miss read-only mounts, full disks, and root's exemption from them."""
    try:
        with tempfile.TemporaryFile(dir=directory) as probe:
            probe.write(b"metaagent")
            probe.flush()
    except OSError as error:
        return error
    return None


def nearest_existing(path: Path) -> Path:
    """`path` itself, or the closest of its parents that exists: where writing it starts."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class RunDirectory:
    """`runs/<UTC time>-<slug>/` with record.json, plan.json, final.md and agents/NN-role.md.

    A write it cannot make (a read-only or full file system) is one line saying what to do:
    `existing` tells a run being resumed from a new one, whose fix is another --run-dir.
    """

    def __init__(self, path: Path, *, existing: bool = True) -> None:
        self.path = path
        self.existing = existing

    @staticmethod
    def check_writable(base: Path | None, *, existing: bool) -> None:
        """A run can write `base` (default: under ./runs): checked before Ray starts or anything runs."""
        target = base if base is not None else RUNS
        place = nearest_existing(target)
        if not place.is_dir():
            option = "--run-dir" if base is not None else "the runs directory"
            raise ConfigError(f"{option} {shlex.quote(str(target))}: {place} is a file, not a directory")
        problem = write_problem(place)
        if problem is not None:
            raise cannot_write(target, problem, existing=existing)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            raise cannot_write(self.path, error, existing=self.existing) from None

    @staticmethod
    def check_new(base: Path) -> None:
        """`base` can hold a new run: missing or an empty directory (checked before anything runs)."""
        if base.exists() and not base.is_dir():
            raise ConfigError(f"--run-dir {base}: a file is in the way, not a directory")
        if base.is_dir() and any(base.iterdir()):
            earlier = f"; to continue that run: metaagent resume {shlex.quote(str(base))}" if (base / "record.json").is_file() else ""
            raise ConfigError(f"--run-dir {base}: the directory is not empty (a run directory belongs to one run){earlier}")

    @classmethod
    def create(cls, base: Path | None, slug_source: str) -> RunDirectory:
        """A new directory: `base` itself when given (it must be new or empty), else a fresh one under ./runs."""
        if base is not None:
            cls.check_new(base)
            directory = cls(base, existing=False)
            with directory._writing():
                make_directories(base)
            return directory
        name = run_dir_name(slug_source)
        path, suffix = RUNS / name, 1
        while path.exists():
            suffix += 1
            path = RUNS / f"{name}-{suffix}"
        directory = cls(path, existing=False)
        with directory._writing():
            make_directories(RUNS)
            path.mkdir(mode=RUN_DIR_MODE)
        return directory

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock while a run writes it; the OS releases it however the process ends."""
        with self._writing():
            handle = open(self.path / ".lock", "a", encoding="utf-8", opener=lambda path, flags: os.open(path, flags, 0o644))
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{self.path}: another run or resume is writing this directory now; wait until it ends") from None
            yield

    def write_plan(self, plan: ExecutionPlan) -> None:
        with self._writing():
            write_atomic(self.path / "plan.json", plan.model_dump_json(indent=2))

    def write_agent_output(self, agent: AgentRecord) -> str:
        """Write one agent's output; returns its path relative to the run directory."""
        number = "-".join(f"{step:02d}" for step in agent.path.steps)
        relative = f"agents/{number}-{slugify(agent.role, 20)}.md"
        body = agent.output if agent.status == "ok" else f"(agent {agent.status}: {agent.error})"
        with self._writing():
            write_atomic(self.path / relative, f"# Agent {agent.id}: {agent.role}\n\n{agent.task}\n\n---\n\n{body}\n")
        return relative

    def write_record(self, record: RunRecord) -> None:
        with self._writing():
            save_record(self.path / "record.json", record)

    def write_final(self, text: str) -> None:
        with self._writing():
            write_atomic(self.path / "final.md", text + "\n")


def make_directories(path: Path) -> None:
    """`path` and its missing parents, each at most RUN_DIR_MODE whatever the umask (`mkdir -p` would
    leave the parents world-writable under umask 0, where others could rename or replace a run)."""
    for directory in [*reversed(path.parents), path]:
        if not directory.exists():
            directory.mkdir(mode=RUN_DIR_MODE, exist_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` in one step, so a reader never sees half a file."""
    make_directories(path.parent)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(descriptor, 0o644)  # mkstemp's 0600 would hide the run's files from other users
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_record(path: Path, record: RunRecord) -> None:
    """Write a record as JSON (the run directory's and `--record PATH`'s copy)."""
    write_atomic(path, record.model_dump_json(indent=2))
