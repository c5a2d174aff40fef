"""The run record, a public JSON contract, and the run directory that keeps it on disk.

`record.json` is rewritten atomically whenever an agent finishes, so a run that stops for any
reason leaves behind everything that had finished.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from .plan import ExecutionPlan

RECORD_VERSION = 1
AgentState = Literal["pending", "ok", "failed", "skipped"]
RunState = Literal["running", "ok", "failed", "interrupted"]


class AgentRecord(BaseModel):
    """One agent of a run: its spec after cleaning, what happened, where and when."""

    id: int
    path: str = ""  # "2" at the top level, "2.1" for agent 1 of agent 2's sub-plan
    role: str
    task: str
    depends_on: list[int]
    layer: int
    status: AgentState = "pending"
    started_at: float | None = None  # epoch seconds, taken inside the task around the LLM call
    finished_at: float | None = None
    inputs_from: list[int] = Field(default_factory=list)
    output: str = ""
    error: str | None = None
    node: str | None = None
    attempts: int = 0
    tokens: dict[str, int] | None = None  # {"prompt": n, "completion": n} when the backend reports them
    llm_ms: float | None = None
    output_file: str | None = None  # relative to the run directory
    reused: bool = False  # taken from the run being resumed, without an LLM call
    sub_run: SubRunRecord | None = None  # the sub-plan this agent delegated its task to


class SubRunRecord(BaseModel):
    """An agent's delegated task: the sub-plan the coordinator made for it, and its agents."""

    query: str
    plan: ExecutionPlan
    layers: list[list[int]]
    warnings: list[str] = Field(default_factory=list)
    agents: list[AgentRecord]


class CoordinatorRecord(BaseModel):
    """How the plan was made, when a coordinator LLM made it."""

    attempts: int
    fallback: bool = False
    errors: list[str] = Field(default_factory=list)  # why earlier answers were rejected
    llm_ms: float | None = None
    tokens: dict[str, int] | None = None


class RunRecord(BaseModel):
    """Everything a run did. Other tools read this: add fields, never rename or remove them."""

    version: int = RECORD_VERSION
    query: str
    plan: ExecutionPlan
    layers: list[list[int]]
    warnings: list[str] = Field(default_factory=list)
    final_output: str = ""
    status: RunState = "running"
    started_at: float = Field(default_factory=time.time)
    finished_at: float | None = None
    llm: dict[str, Any] = Field(default_factory=dict)  # backend and model, never secrets
    settings: dict[str, Any] = Field(default_factory=dict)  # what `resume` reuses: options, limits
    slots: int | None = None
    run_dir: str | None = None
    coordinator: CoordinatorRecord | None = None
    agents: list[AgentRecord]

    @classmethod
    def start(cls, plan: ExecutionPlan, query: str, **fields: Any) -> RunRecord:
        return cls(query=query, plan=plan, layers=plan.get_execution_layers(), warnings=plan.warnings, agents=agent_records(plan), **fields)

    def compose_final_output(self) -> str:
        return compose_final_output(self.plan, self.agents)

    def failed_agents(self) -> list[int]:
        return [agent.id for agent in self.agents if agent.status != "ok"]

    def makespan(self) -> float | None:
        """Seconds from the first agent's start to the last agent's finish."""
        starts = [agent.started_at for agent in self.agents if agent.started_at is not None]
        ends = [agent.finished_at for agent in self.agents if agent.finished_at is not None]
        return max(ends) - min(starts) if starts and ends else None


def compose_final_output(plan: ExecutionPlan, agents: list[AgentRecord]) -> str:
    """The sink agent's output; with several sinks, each under a heading in index order."""
    sinks = [agents[index] for index in plan.sinks()]
    if len(sinks) == 1:
        return _output_or_reason(sinks[0])
    return "\n\n".join(f"## Agent {agent.id} ({agent.role}): {agent.task}\n\n{_output_or_reason(agent)}" for agent in sinks)


def agent_records(plan: ExecutionPlan, prefix: str = "") -> list[AgentRecord]:
    """A pending record for every agent of a plan (`prefix` is the parent's path in a sub-plan)."""
    layer_of = plan.layer_of()
    return [
        AgentRecord(
            id=index, path=f"{prefix}{index}", role=spec.role.value, task=spec.task, depends_on=spec.depends_on, layer=layer_of[index]
        )
        for index, spec in enumerate(plan.agents)
    ]


def _output_or_reason(agent: AgentRecord) -> str:
    if agent.status == "ok":
        return agent.output
    return f"(agent {agent.id} {agent.status}: {agent.error or 'no output'})"


def slugify(text: str, limit: int = 40) -> str:
    """A short, safe file-name fragment of any text (LLM output never becomes a path as is)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "run"


def run_dir_name(slug_source: str) -> str:
    """A run directory's default name: `<UTC time>-<slug>`."""
    return f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{slugify(slug_source)}"


class RunDirectory:
    """`runs/<UTC time>-<slug>/` with record.json, plan.json, final.md and agents/NN-role.md."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, base: Path | None, slug_source: str) -> RunDirectory:
        """A new directory: `base` itself when given, else a fresh one under ./runs."""
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
            return cls(base)
        root = Path("runs")
        name = run_dir_name(slug_source)
        path, suffix = root / name, 1
        while path.exists():
            suffix += 1
            path = root / f"{name}-{suffix}"
        path.mkdir(parents=True)
        return cls(path)

    def write_plan(self, plan: ExecutionPlan) -> None:
        write_atomic(self.path / "plan.json", plan.model_dump_json(indent=2))

    def write_agent_output(self, agent: AgentRecord) -> str:
        """Write one agent's output; returns its path relative to the run directory."""
        number = "-".join(f"{int(step):02d}" for step in (agent.path or str(agent.id)).split("."))
        relative = f"agents/{number}-{slugify(agent.role, 20)}.md"
        body = agent.output if agent.status == "ok" else f"(agent {agent.status}: {agent.error})"
        write_atomic(self.path / relative, f"# Agent {agent.id}: {agent.role}\n\n{agent.task}\n\n---\n\n{body}\n")
        return relative

    def write_record(self, record: RunRecord) -> None:
        save_record(self.path / "record.json", record)

    def write_final(self, text: str) -> None:
        write_atomic(self.path / "final.md", text + "\n")


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` in one step, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
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
