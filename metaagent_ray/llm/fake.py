"""A deterministic backend for tests, demos and benchmarks.

It answers by identity (agent id, role, task, the agents whose outputs it received), never by call
order, so runs are reproducible whatever order Ray finishes tasks in. Latency can be simulated per
agent to show scheduling, faults injected per agent, and an agent whose task contains "[delegate]"
delegates to a sub-plan whenever its depth allows. Its joiner (`--replan`) replans once when an agent
failed or answered nothing, by the agents' results in its prompt.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError
from ..subjects import enumerated_subjects
from .base import LLM, MB, LLMConfig, LLMError, LLMRequest, LLMResponse, ModelFootprint, PromptStyle, TextCallback, parse_options

DELEGATE_MARKER = "[delegate]"  # an agent whose task holds this delegates whenever it may
REPLACES = "(replaces agent"  # the fake joiner's mark on a replacement's task: "... (replaces agent 1)"


class FakeLatency(BaseModel):
    """Seconds each call takes: a default, the coordinator's, and per agent index."""

    default: float = Field(default=0.0, ge=0)
    coordinator: float | None = Field(default=None, ge=0)
    agents: dict[int, float] = Field(default_factory=dict)

    @field_validator("agents")
    @classmethod
    def _non_negative(cls, value: dict[int, float]) -> dict[int, float]:
        for agent, seconds in value.items():
            if seconds < 0:
                raise ValueError(f"agent {agent}: latency must be >= 0")
        return value

    @classmethod
    def from_spec(cls, spec: str | float | None) -> FakeLatency:
        """SPEC is seconds per call, or a JSON file {"default": s, "coordinator": s, "<agent index>": s}."""
        if spec is None or spec == "":
            return cls()
        if isinstance(spec, (int, float)):
            return cls(default=float(spec))
        try:
            return cls(default=float(spec))
        except ValueError:
            pass
        path = Path(spec)
        try:
            data = json.loads(path.read_text())
        except OSError as error:
            raise ConfigError(f"--fake-latency {spec}: not a number and not a readable file ({error.strerror})") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"--fake-latency {spec}: not valid JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--fake-latency {spec}: expected a JSON object of seconds")
        named = {key: data[key] for key in ("default", "coordinator") if key in data}
        unknown = [key for key in data if key not in named and not str(key).isdigit()]
        if unknown:
            raise ConfigError(f"--fake-latency {spec}: unknown keys {unknown} (use default, coordinator or agent indices)")
        try:
            return cls(**named, agents={int(key): value for key, value in data.items() if key not in named})
        except ValidationError as error:
            first = error.errors()[0]
            raise ConfigError(f"--fake-latency {spec}: {first['msg']}") from None

    def seconds(self, request: LLMRequest) -> float:
        if request.caller == "coordinator":
            return self.coordinator if self.coordinator is not None else self.default
        return self.agents.get(request.agent_id if request.agent_id is not None else -1, self.default)


class FakeFaults(BaseModel):
    """Injected failures: per agent "always", "hang" or a number of failing first attempts; the coordinator's
    "garbage"; the joiner's "garbage"."""

    agents: dict[int, Literal["always", "hang"] | int] = Field(default_factory=dict)
    coordinator: Literal["garbage", "always"] | None = None
    joiner: Literal["garbage"] | None = None

    @classmethod
    def from_spec(cls, spec: str | None) -> FakeFaults:
        """SPEC like `3` (always fails), `3:1` (fails its first attempt), `3:hang`, `coordinator:garbage`,
        `joiner:garbage`; comma-separated."""
        faults = cls()
        for item in filter(None, (part.strip() for part in (spec or "").split(","))):
            target, _, kind = item.partition(":")
            kind = kind or "always"
            if target == "coordinator" and kind in ("garbage", "always"):
                faults.coordinator = kind  # type: ignore[assignment]
            elif target == "joiner" and kind == "garbage":
                faults.joiner = "garbage"
            elif target.isdigit() and (kind in ("always", "hang") or kind.isdigit()):
                faults.agents[int(target)] = int(kind) if kind.isdigit() else kind  # type: ignore[assignment]
            else:
                raise ConfigError(
                    f"--fake-fail {spec}: cannot read {item!r} (use AGENT, AGENT:N, AGENT:hang, coordinator:garbage or joiner:garbage)"
                )
        return faults


class FakeOptions(BaseModel):
    """The fake backend's options: `latency` and `fail` as the CLI's --fake-latency and --fake-fail take them."""

    model_config = ConfigDict(extra="forbid")

    latency: FakeLatency = Field(default_factory=FakeLatency)
    fail: FakeFaults = Field(default_factory=FakeFaults)
    model_mb: float = Field(default=0.0, ge=0)  # the model size slot planning assumes (no model is loaded)
    plan: str | None = None  # a file whose text the coordinator answers with (valid or not), streamed like a real plan

    @field_validator("latency", mode="before")
    @classmethod
    def _latency_spec(cls, value: object) -> object:
        return value if isinstance(value, (FakeLatency, dict)) else FakeLatency.from_spec(value)  # type: ignore[arg-type]

    @field_validator("fail", mode="before")
    @classmethod
    def _fail_spec(cls, value: object) -> object:
        return value if isinstance(value, (FakeFaults, dict)) else FakeFaults.from_spec(value)  # type: ignore[arg-type]


class FakeLLM(LLM):
    """Answers from the request's identity; plans from the query's shape."""

    delegates = True  # a task holding DELEGATE_MARKER delegates, so recursion can be tested
    prompt_style: PromptStyle = "chat"

    def __init__(self, options: FakeOptions) -> None:
        self.options = options
        self._plan_text = _read_plan(options.plan) if options.plan is not None else ""

    def describe(self) -> str:
        return "fake (deterministic, no model)"

    def check(self) -> None:
        return None

    def footprint(self) -> ModelFootprint:
        """No model; option `model_mb` (default 0) pretends each instance holds one of that size."""
        return ModelFootprint(
            source=f"fake: {self.options.model_mb:g} MB per instance (option model_mb)",
            instance_bytes=int(self.options.model_mb * MB),
            gpu_unused_reason="the fake backend runs no model",
        )

    def complete(self, request: LLMRequest) -> LLMResponse:
        seconds = self.options.latency.seconds(request)
        text = self._answer(request)
        if request.on_text is not None:
            _stream(text, seconds, request.on_text)
        elif seconds:
            time.sleep(seconds)
        self._inject_fault(request)
        words = sum(len(message.content.split()) for message in request.messages)
        return LLMResponse(text=text, prompt_tokens=words, completion_tokens=len(text.split()), llm_ms=seconds * 1000)

    def _answer(self, request: LLMRequest) -> str:
        if request.caller == "coordinator" and self.options.fail.coordinator == "garbage":
            return "Sure! Here is a plan: agents, roles... {not json"
        if request.caller == "joiner":
            return "Looks done to me! {decision: finish" if self.options.fail.joiner == "garbage" else json.dumps(joiner_decision(request))
        if request.json_schema is not None and self.options.plan is not None:
            return self._plan_text
        if request.json_schema is not None:
            return json.dumps(plan_for_query((request.query or request.task or "").splitlines()[0]))
        if request.may_delegate and DELEGATE_MARKER in (request.task or ""):
            return "DELEGATE"
        return answer_for(request)

    def _inject_fault(self, request: LLMRequest) -> None:
        faults = self.options.fail
        if request.caller == "coordinator":
            if faults.coordinator == "always":
                raise LLMError("injected failure of the coordinator call")
            return
        fault = faults.agents.get(request.agent_id if request.agent_id is not None else -1)
        if fault == "hang":  # never answers: only the call's timeout, or the runtime's, ends it
            if not threading.Event().wait(request.timeout):
                raise LLMError(f"agent {request.agent_id}: no answer within {request.timeout:g} s", transient=True)
        if fault == "always" or (isinstance(fault, int) and request.attempt <= fault):
            raise LLMError(f"injected failure of agent {request.agent_id} (attempt {request.attempt})", transient=fault != "always")


def _stream(text: str, seconds: float, on_text: TextCallback) -> None:
    """Hand out the answer word by word, evenly over `seconds`, as a streaming server would."""
    pieces = re.findall(r"\s*\S+", text) or [text]
    start = time.monotonic()
    for index, piece in enumerate(pieces):
        time.sleep(max(0.0, start + seconds * (index + 1) / len(pieces) - time.monotonic()))
        on_text(piece)


def answer_for(request: LLMRequest) -> str:
    """The fake agent answer: it names role, task and the agents whose outputs it received."""
    inputs = ", ".join(str(agent) for agent in request.inputs_from) or "none"
    return f"[{request.role}] agent {request.agent_id}: {request.task}\nInputs from agents: {inputs}"


def joiner_decision(request: LLMRequest) -> dict:
    """The fake joiner: replans once when an agent failed or answered nothing, else finishes.

    It reads the agents from its prompt's JSON lines. Each such agent gets a replacement, and so does
    everything downstream of it, depending on the replacements: the final answer then uses them. A
    replacement's task says which agent it replaces, so the next judgement finishes.
    """
    agents = [json.loads(line) for line in request.messages[-1].content.splitlines() if line.startswith('{"id": ')]
    replaced = {int(number) for agent in agents for number in re.findall(rf"{re.escape(REPLACES)} (\d+)\)", agent["task"])}
    broken = {
        agent["id"]
        for agent in agents
        if (agent["status"] != "ok" or not agent.get("output", "").strip()) and agent["id"] not in replaced and REPLACES not in agent["task"]
    }
    if not broken:
        return {"decision": "finish", "reason": "every agent answered", "agents": []}
    redo = sorted(broken)
    for agent in agents:  # ids ascend, and an agent depends only on agents before it
        if agent["id"] not in redo and set(agent["depends_on"]) & set(redo):
            redo.append(agent["id"])
    new_id = {old: len(agents) + position for position, old in enumerate(redo)}
    new_agents = [
        {
            "role": agents[old]["role"],
            "task": f"{agents[old]['task']} {REPLACES} {old})",
            "depends_on": [new_id.get(dep, dep) for dep in agents[old]["depends_on"]],
        }
        for old in redo
    ]
    failed = ", ".join(str(agent) for agent in sorted(broken))
    return {"decision": "replan", "reason": f"agent {failed} failed or answered nothing", "agents": new_agents}


def plan_for_query(query: str) -> dict:
    """A sensible plan shape: parallel researchers for enumerated items, else a short chain."""
    items, topic = enumerated_subjects(query)
    focus = f" {topic}" if topic else ""
    if len(items) >= 2:
        agents = [{"role": "RESEARCHER", "task": f"Research {item}{focus}", "depends_on": []} for item in items]
        researchers = list(range(len(items)))
        agents.append({"role": "ANALYZER", "task": f"Compare {', '.join(items)}{focus}", "depends_on": researchers})
        agents.append({"role": "SYNTHESIZER", "task": "Write the final report", "depends_on": [len(items)]})
        return {"description": f"Parallel research on {len(items)} items, then analysis and synthesis", "agents": agents}
    return {
        "description": "Research, analyze, then synthesize",
        "agents": [
            {"role": "RESEARCHER", "task": f"Research: {query}", "depends_on": []},
            {"role": "ANALYZER", "task": "Analyze the research findings", "depends_on": [0]},
            {"role": "SYNTHESIZER", "task": "Write the final answer", "depends_on": [1]},
        ],
    }


def create(config: LLMConfig) -> FakeLLM:
    return FakeLLM(parse_options("fake", FakeOptions, config.options))


def _read_plan(path: str) -> str:
    """The text of --fake-plan FILE, read when the backend is made, so a missing file fails before anything runs."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--fake-plan {path}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
