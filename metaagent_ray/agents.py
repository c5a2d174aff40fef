"""What one agent does: turn its role, task, the query and its dependencies' outputs into an LLM call.

Plain Python with no Ray in it: the runtime wraps `run_agent` in a Ray task, and tests can call it
directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

from .llm import LLMConfig, LLMError, LLMRequest, Message, get_llm
from .plan import AgentSpec
from .prompts import load_prompt

AgentStatus = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True)
class AgentContext:
    """Everything an agent needs besides its dependencies' results."""

    agent_id: int
    spec: AgentSpec
    query: str
    llm: LLMConfig
    depth: int = 0
    max_tokens: int | None = None


@dataclass
class AgentResult:
    """What an agent produced, with the times measured around its LLM call."""

    agent_id: int
    role: str
    status: AgentStatus
    output: str = ""
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    inputs_from: list[int] = field(default_factory=list)
    missing_inputs: list[int] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    llm_ms: float | None = None
    node: str | None = None
    attempt: int = 1


def format_inputs(inputs: Sequence[AgentResult], specs: dict[int, AgentSpec]) -> str:
    """The dependencies' outputs, each labelled with the agent id and role that produced it."""
    if not inputs:
        return "You have no inputs from other agents."
    blocks = ["Outputs of the agents you depend on:"]
    for result in inputs:
        spec = specs.get(result.agent_id)
        label = f"### Agent {result.agent_id} ({result.role})" + (f": {spec.task}" if spec else "")
        if result.status == "ok":
            blocks.append(f"{label}\n{result.output}")
        else:
            reason = result.error or result.status
            blocks.append(f"{label}\n(missing: this agent did not finish: {reason}. Work without it and say so.)")
    return "\n\n".join(blocks)


def build_messages(context: AgentContext, inputs: Sequence[AgentResult], specs: dict[int, AgentSpec]) -> list[Message]:
    """System prompt from the role, user prompt from the query, task and inputs."""
    role_prompt = load_prompt(f"roles/{context.spec.role.value.lower()}")
    user_prompt = load_prompt("agent").format(
        query=context.query, task=context.spec.task, inputs=format_inputs(inputs, specs)
    )
    return [Message("system", role_prompt), Message("user", user_prompt)]


def run_agent(context: AgentContext, inputs: Sequence[AgentResult], specs: dict[int, AgentSpec]) -> AgentResult:
    """Call the LLM once for this agent; a failed call becomes a `failed` result, never an exception."""
    received = [result.agent_id for result in inputs if result.status == "ok"]
    missing = [result.agent_id for result in inputs if result.status != "ok"]
    request = LLMRequest(
        messages=build_messages(context, inputs, specs),
        caller="agent",
        query=context.query,
        agent_id=context.agent_id,
        role=context.spec.role.value,
        task=context.spec.task,
        inputs_from=received,
        max_tokens=context.max_tokens,
    )
    result = AgentResult(
        agent_id=context.agent_id,
        role=context.spec.role.value,
        status="ok",
        inputs_from=received,
        missing_inputs=missing,
    )
    llm = get_llm(context.llm)
    result.started_at = time.time()
    try:
        response = llm.complete(request)
    except LLMError as error:
        result.status, result.error = "failed", str(error)
    except Exception as error:  # a backend bug must fail this agent, not the whole run
        result.status, result.error = "failed", f"{type(error).__name__}: {error}"
    else:
        result.output = response.text
        result.prompt_tokens, result.completion_tokens = response.prompt_tokens, response.completion_tokens
        result.llm_ms = response.llm_ms
    result.finished_at = time.time()
    return result
