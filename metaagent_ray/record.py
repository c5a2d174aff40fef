"""The run record, a public JSON contract: what a run did, agent by agent.

The run directory that keeps it on disk, with the agents' outputs, the pictures and the report, is
run_directory.py.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Any, Iterator, Literal

from pydantic import BaseModel, Field, model_validator

from .llm import Usage
from .paths import ROOT, AgentPath
from .plan import ExecutionPlan
from .version import __version__

RECORD_VERSION = 1
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


class StructuredCallRecord(BaseModel):
    """How a schema-constrained call of the coordinator's role went (the plan's, or the joiner's decision)."""

    attempts: int
    errors: list[str] = Field(default_factory=list)  # why earlier answers were rejected
    llm_ms: float | None = None
    tokens: Usage | None = None
    started_at: float | None = None  # epoch seconds around the LLM calls
    finished_at: float | None = None


class CoordinatorRecord(StructuredCallRecord):
    """How the plan was made, when a coordinator LLM made it."""

    fallback: bool = False
    streamed: bool = False  # agents started while the plan was still being written
    started_early: list[int] = Field(default_factory=list)  # the agents that did
    set_aside: str | None = None  # why what they did was cancelled and not kept, when it was


class JoinerRecord(StructuredCallRecord):
    """The joiner's judgement of a round's results: its decision and why; no decision when it gave no valid
    answer (`errors` say why) and the run finished as it was."""

    decision: Literal["finish", "replan"] | None = None
    reason: str = ""


class RoundRecord(BaseModel):
    """One round of a run: the agents it added (the coordinator's plan, then each replan's), and the joiner's
    judgement of it (None when the joiner was not asked: no replan left, or the run stopped first)."""

    agents: list[int]
    joiner: JoinerRecord | None = None


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
    # The rounds of `--replan`, in order; a record written before rounds existed had one round of every agent.
    rounds: list[RoundRecord] = Field(default_factory=list)

    @model_validator(mode="after")
    def _agents_match_plan(self) -> RunRecord:
        _check_agents_match(self.plan, self.agents)
        if not self.rounds:
            self.rounds = [RoundRecord(agents=list(range(len(self.agents))))]
        if sorted(agent for round_ in self.rounds for agent in round_.agents) != list(range(len(self.agents))):
            raise ValueError("its rounds do not hold every agent exactly once")
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
        """The last round's sinks' outputs: earlier rounds' sinks were judged by the joiner, which planned again."""
        last = set(self.rounds[-1].agents)
        return compose_final_output(self.plan, self.agents, [sink for sink in self.plan.sinks() if sink in last])

    def end(self, status: RunState) -> None:
        """The run ended with `status`: its final output as the agents left it, and the time."""
        self.status = status
        self.final_output = self.compose_final_output()
        self.finished_at = time.time()

    def failed_agents(self) -> list[int]:
        return [agent.id for agent in self.agents if agent.status != "ok"]

    def outcome(self) -> RunState:
        """How a run whose agents all finished ended: ok when every agent of its last round succeeded (the
        joiner routed around an earlier round's failures, or chose to finish with them: then that round is last)."""
        return "ok" if all(self.agents[agent].status == "ok" for agent in self.rounds[-1].agents) else "failed"

    def settled_agents(self) -> set[int]:
        """Agents of the rounds the joiner judged: a resume keeps them as they are, failed or not."""
        return {agent for round_ in self.rounds if round_.joiner is not None for agent in round_.agents}

    def add_round(self, plan: ExecutionPlan) -> list[int]:
        """The joiner replanned: `plan` is this run's plan with new agents after the old ones. They start
        pending, as a new round; returns their ids."""
        added = list(range(len(self.agents), len(plan.agents)))
        self.plan, self.layers = plan, plan.get_execution_layers()
        self.agents += agent_records(plan)[len(self.agents) :]
        self.rounds.append(RoundRecord(agents=added))
        return added

    def round_of(self) -> dict[int, int]:
        """Agent id -> its round, counted from 1."""
        return {agent: number for number, round_ in enumerate(self.rounds, 1) for agent in round_.agents}

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


def compose_final_output(plan: ExecutionPlan, agents: list[AgentRecord], sinks_of: list[int] | None = None) -> str:
    """The sink agent's output; with several sinks, each under a heading in index order. `sinks_of`: these
    sinks only (the last round's)."""
    sinks = [agents[index] for index in (plan.sinks() if sinks_of is None else sinks_of)]
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


def kept_agents(plan: ExecutionPlan, agents: list[AgentRecord], settled: set[int] | None = None) -> dict[int, AgentRecord]:
    """What a resume hands the runtime of these agents (see `resume_choice`): reused ones as they were and
    `reused`, the ones whose sub-plan continues as `delegated`, with their sub-plan's agents as they were."""
    reuse, resume = resume_choice(plan, agents, settled)
    kept = {index: agents[index].model_copy(update={"reused": True}, deep=True) for index in reuse}
    kept.update({index: agents[index].model_copy(update={"status": "delegated"}, deep=True) for index in resume})
    return kept


def resume_choice(plan: ExecutionPlan, agents: list[AgentRecord], settled: set[int] | None = None) -> tuple[set[int], set[int]]:
    """What a resume keeps of a plan's agents: those it reuses as they are, and the delegated agents
    whose unfinished sub-plan it continues (they did not finish, but none of their inputs changes).
    Every other agent runs again: it did not finish, or something upstream of it runs again. `settled`
    agents (of rounds the joiner judged, `RunRecord.settled_agents`) never run again, failed or not."""
    settled = settled or set()
    rerun = plan.descendants({agent.id for agent in agents if agent.status != "ok" and agent.id not in settled})
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
