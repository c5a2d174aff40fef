"""The run directory: one object owning every file a run keeps, so the runtime hands it results, not names.

`runs/<UTC time>-<slug>/` (or `--run-dir DIR`) holds `record.json`, `plan.json`, `final.md`,
`agents/NN-role.md` (sub-plan agents `NN-MM-role.md`), the pictures (`graph.svg`, `timeline.svg`,
`graph.mmd`), `report.html` and `.lock`. The runtime calls `start` with the new record, `agent_finished`
with each agent's result, `round_added` when the joiner replanned (`--replan`), `record_changed` when
the record changed otherwise, and `finish` with the ended record; the directory decides what goes where and when.

`record.json` is rewritten atomically as agents finish, sub-plan agents included, at most once every
CHECKPOINT_INTERVAL_S and once at the end, so a run that stops for any reason leaves behind
everything that had finished (one killed outright, all but its last second). A run directory belongs
to one run: a new run refuses a directory that holds files, and an OS file lock keeps a second run or
resume from writing it at the same time. A write it cannot make (a read-only or full file system) is
one line saying what to do.
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
from pathlib import Path
from typing import Iterator

from . import files
from .errors import ConfigError, MetaAgentError
from .record import AgentRecord, RunRecord
from .report import report_html
from .viz import pictures

RUNS = Path("runs")  # where runs are kept unless --run-dir says otherwise
RUN_DIR_MODE = 0o755  # a run directory and the directories made for it: others may read them, never write them
CHECKPOINT_INTERVAL_S = 1.0  # the most a run killed outright can lose of its record
RECORD = "record.json"
PLAN = "plan.json"
FINAL = "final.md"
REPORT = "report.html"
LOCK = ".lock"


class RunDirectoryError(MetaAgentError):
    """A run directory cannot be written (read-only, full, not permitted); the line says what to do."""


class RunFiles:
    """What a run hands its files to. This one keeps nothing (a run with `save=False`); RunDirectory keeps them."""

    path: Path | None = None

    def locked(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def start(self, record: RunRecord) -> None:
        """The run begins with this record (every agent pending, or reused when resuming)."""

    def agent_finished(self, agent: AgentRecord) -> None:
        """An agent of the run's record (a sub-plan's agent included) has its result."""

    def record_changed(self) -> None:
        """Something else in the run's record changed (a sub-plan, a warning)."""

    def round_added(self, record: RunRecord) -> None:
        """The joiner replanned: the run's plan has new agents, pending."""

    def checkpoint_due_in(self) -> float | None:
        """Seconds until unsaved changes must be written (`checkpoint`); None when there are none."""
        return None

    def checkpoint(self) -> None:
        """Write what changed in the record since it was last written."""

    def finish(self, record: RunRecord) -> None:
        """The run has ended (its status, final output and end time set): keep everything it leaves."""


NOT_SAVED = RunFiles()  # a run with save=False: its files are kept nowhere


class RunDirectory(RunFiles):
    """A run's directory and every file in it; see the module's docstring for the layout.

    `existing` tells a run being resumed (or drawn) from a new one: their fixes for a refused write differ.
    """

    def __init__(self, path: Path, *, existing: bool = True) -> None:
        self.path: Path = path
        self.existing = existing
        self._record: RunRecord | None = None
        self._changed_since: float | None = None  # monotonic: the oldest change not yet written
        self._written_at = 0.0

    # --- where a run goes, checked before anything runs ---------------------------------------

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

    @staticmethod
    def check_new(base: Path) -> None:
        """`base` can hold a new run: missing or an empty directory (checked before anything runs)."""
        if base.exists() and not base.is_dir():
            raise ConfigError(f"--run-dir {base}: a file is in the way, not a directory")
        if base.is_dir() and any(base.iterdir()):
            earlier = f"; to continue that run: metaagent resume {shlex.quote(str(base))}" if (base / RECORD).is_file() else ""
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

    @classmethod
    def earlier(cls, path: Path) -> RunDirectory:
        """An earlier run's directory, to resume: checked writable before its lock is taken."""
        cls.check_writable(path, existing=True)
        return cls(path, existing=True)

    @property
    def record_file(self) -> Path:
        return self.path / RECORD

    @property
    def report_file(self) -> Path:
        return self.path / REPORT

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock while a run writes it; the OS releases it however the process ends."""
        with self._writing():
            handle = open(self.path / LOCK, "a", encoding="utf-8", opener=lambda path, flags: os.open(path, flags, 0o644))
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{self.path}: another run or resume is writing this directory now; wait until it ends") from None
            yield

    def in_use(self) -> bool:
        """Whether a live process holds the directory's lock now: a run or a resume is writing it."""
        try:
            handle = open(self.path / LOCK, encoding="utf-8")
        except FileNotFoundError:
            return False
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    # --- what the runtime hands it --------------------------------------------------------------

    def start(self, record: RunRecord) -> None:
        """Keep this run's record from now on (it says where it is kept); write the plan and the record."""
        self._record = record
        record.run_dir = str(self.path)
        self._write(PLAN, record.plan.model_dump_json(indent=2))
        self._write_record()

    def round_added(self, record: RunRecord) -> None:
        """The plan with the new round's agents, and the record, now: a resume continues the round."""
        self._write(PLAN, record.plan.model_dump_json(indent=2))
        self._write_record()

    def agent_finished(self, agent: AgentRecord) -> None:
        """Write the agent's output file and its sub-plan agents' (each record learns its `output_file`),
        and the record when a checkpoint is due."""
        for finished in _with_sub_run(agent):
            finished.output_file = self._write_agent_output(finished)
        self.record_changed()

    def record_changed(self) -> None:
        """The record changed: write it now if it was last written CHECKPOINT_INTERVAL_S ago or more, else when
        `checkpoint_due_in` says (so thousands of agents do not rewrite it thousands of times)."""
        self._changed_since = self._changed_since or time.monotonic()
        if time.monotonic() - self._written_at >= CHECKPOINT_INTERVAL_S:
            self.checkpoint()

    def checkpoint_due_in(self) -> float | None:
        if self._changed_since is None:
            return None
        return max(0.0, self._written_at + CHECKPOINT_INTERVAL_S - time.monotonic())

    def checkpoint(self) -> None:
        if self._changed_since is not None:
            self._write_record()

    def finish(self, record: RunRecord) -> None:
        """The ended run: final.md, record.json, the pictures and report.html."""
        self._record = record
        self._write(FINAL, record.final_output + "\n")
        self._write_record()
        self.write_pictures(record)
        self.write_report(record)

    # --- files written on their own -------------------------------------------------------------

    def write_record(self, record: RunRecord) -> None:
        """Replace record.json with `record` (a run brought back from a job, a test's record)."""
        with self._writing():
            save_record(self.record_file, record)

    def write_pictures(self, record: RunRecord) -> list[Path]:
        """graph.svg, timeline.svg and graph.mmd of the run; returns their paths."""
        return [self._write(name, text) for name, text in pictures(record).items()]

    def write_report(self, record: RunRecord) -> Path:
        """report.html: the run's whole story on one page; returns its path."""
        return self._write(REPORT, report_html(record))

    def _write_record(self) -> None:
        assert self._record is not None, "start(record) comes first"
        self.write_record(self._record)
        self._written_at, self._changed_since = time.monotonic(), None

    def _write_agent_output(self, agent: AgentRecord) -> str:
        """Write one agent's output; returns its path relative to the run directory."""
        number = "-".join(f"{step:02d}" for step in agent.path.steps)
        relative = f"agents/{number}-{slugify(agent.role, 20)}.md"
        body = agent.output if agent.status == "ok" else f"(agent {agent.status}: {agent.error})"
        self._write(relative, f"# Agent {agent.id}: {agent.role}\n\n{agent.task}\n\n---\n\n{body}\n")
        return relative

    def _write(self, relative: str, text: str) -> Path:
        path = self.path / relative
        with self._writing():
            write_atomic(path, text)
        return path

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            raise cannot_write(self.path, error, existing=self.existing) from None


def _with_sub_run(agent: AgentRecord) -> Iterator[AgentRecord]:
    """The agent, then its sub-run's agents (recursively)."""
    yield agent
    for sub_agent in agent.sub_run.agents if agent.sub_run else []:
        yield from _with_sub_run(sub_agent)


def slugify(text: str, limit: int = 40) -> str:
    """A short, safe file-name fragment of any text (LLM output never becomes a path as is)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "run"


def run_dir_name(slug_source: str) -> str:
    """A run directory's default name: `<UTC time>-<slug>`."""
    return f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{slugify(slug_source)}"


def cannot_write(directory: Path, error: OSError, *, existing: bool) -> RunDirectoryError:
    """The line for a run directory that refused a write, with what to do: `existing` is a run being
    resumed (or drawn); a new run whose record is already there can be resumed once writes work again."""
    reason = (error.strerror or type(error).__name__).lower()
    where = shlex.quote(str(directory))
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    if existing:
        fix = "free some space there" if full else "make it writable, or copy it to a writable place and use the copy"
    elif (directory / RECORD).is_file():
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


def make_directories(path: Path) -> None:
    """`path` and its missing parents, each at most RUN_DIR_MODE whatever the umask (`mkdir -p` would
    leave the parents world-writable under umask 0, where others could rename or replace a run)."""
    for directory in [*reversed(path.parents), path]:
        if not directory.exists():
            directory.mkdir(mode=RUN_DIR_MODE, exist_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` in one step, so a reader never sees half a file; its directories are made as a run's."""
    make_directories(path.parent)
    files.write_atomic(path, text)


def save_record(path: Path, record: RunRecord) -> None:
    """Write a record as JSON (the run directory's and `--record PATH`'s copy)."""
    write_atomic(path, record.model_dump_json(indent=2))


def new_run_files(run_dir: Path | str | None, query: str, save: bool) -> RunFiles:
    """Where a new run keeps its files: `run_dir` when given, else a fresh directory under ./runs named after the
    query; nowhere when it does not `save`."""
    return RunDirectory.create(Path(run_dir) if run_dir else None, query or "plan") if save else NOT_SAVED
