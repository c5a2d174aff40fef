"""What one agent does: turn its role, task, the query and its dependencies' outputs into an LLM call.

Plain Python with no Ray in it: an executor (executors.py) runs `run_agent` in one of its threads,
and tests can call it directly. The result is the agent's `AgentRecord`, the one type for it from
the executor to the record. Transient LLM errors are retried here with exponential backoff and
jitter; an agent that may delegate can answer DELEGATE, and then gets a sub-plan from the
coordinator for the runtime to run. Its answer is bounded as every answer is (llm/bounds.py): a
budget by role, the stops of its prompt, and what is kept cut at template markers and repeats.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from .coordinator import make_plan
from .llm import LLM, LLMConfig, LLMError, LLMRequest, LLMResponse, Message, PromptStyle, TextCallback, get_llm
from .llm.bounds import TEMPLATE_MARKERS, finish_answer
from .paths import AgentPath
from .plan import AgentSpec
from .prompts import load_prompt
from .record import AgentRecord, FailureKind, SubRunRecord, valid_text
from .settings import Limits
from .tracing import TraceParent, complete

DELEGATE = "DELEGATE"
# An agent's document prompt (its role's worked examples, then its notes and task) ends where the
# model starts the next example, a note of its own ("- ..."), a new paragraph, or a second answer
# under the document's own answer label (its last line, "Note:" or "Analysis:": `answer_stops` adds it).
DOCUMENT_STOP = ("\nNotes received:", "\nTask:", "\n- ", "\n\n", "\n###")
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 8.0
DEADLINE_GRACE_S = 5.0


def agent_deadline_s(limits: Limits) -> float | None:
    """How long one agent's work may take before the runtime abandons it: every try, and the backoff between."""
    call = limits.call_timeout
    if call is None:
        return None
    return call * (limits.retries + 1) + BACKOFF_MAX_S * limits.retries + DEADLINE_GRACE_S


@dataclass(frozen=True)
class AgentContext:
    """Everything an agent needs besides its dependencies' results."""

    path: AgentPath  # "2" for a top-level agent, "2.1" for agent 1 of agent 2's sub-plan
    spec: AgentSpec
    query: str
    llm: LLMConfig
    limits: Limits
    depth: int = 0
    layer: int = 0
    delegation_allowed: bool = True  # False once the run's total agent budget is spent
    submitted_at: float | None = None  # when the runtime handed the agent to Ray
    trace: TraceParent | None = None  # its `invoke_agent` span, set by the hub when the run is traced (tracing.py)

    @property
    def agent_id(self) -> int:
        return self.path.index

    @property
    def may_delegate(self) -> bool:
        return self.delegation_allowed and self.depth < self.limits.max_depth


def format_inputs(inputs: Sequence[AgentRecord]) -> str:
    """The dependencies' outputs, each labelled with the agent id, role and task that produced it."""
    if not inputs:
        return "You have no inputs from other agents."
    blocks = ["Outputs of the agents you depend on:"]
    for result in inputs:
        label = f"### Agent {result.id} ({result.role}): {result.task}"
        if result.status == "ok":
            blocks.append(f"{label}\n{result.output}")
        else:
            reason = result.error or result.status
            blocks.append(f"{label}\n(missing: this agent did not finish: {reason}. Work without it and say so.)")
    return "\n\n".join(blocks)


def document_inputs(inputs: Sequence[AgentRecord]) -> str:
    """The dependencies' outputs as the document prompt's bullet list, one line each, labelled with their task."""
    if not inputs:
        return "(none)"
    lines = []
    for result in inputs:
        text = " ".join(result.output.split()) if result.status == "ok" else "(missing: this agent did not finish)"
        lines.append(f"- {result.task}: {text}")
    return "\n".join(lines)


def build_messages(
    context: AgentContext,
    inputs: Sequence[AgentRecord],
    *,
    may_delegate: bool = False,
    style: PromptStyle = "chat",
) -> list[Message]:
    """System prompt from the role, user prompt from the query, task and inputs.

    A base model (`style` "document") gets instead one document to continue: a worked example of
    its role's answer, then its own task, so that it writes an answer rather than more prompt.
    """
    if style == "document":
        document = load_prompt(f"document/{context.spec.role.value.lower()}").format(
            query=context.query, task=context.spec.task, inputs=document_inputs(inputs)
        )
        return [Message("document", document)]
    role_prompt = load_prompt(f"roles/{context.spec.role.value.lower()}")
    user_prompt = load_prompt("agent").format(
        query=context.query,
        task=context.spec.task,
        inputs=format_inputs(inputs),
        delegation="\n\n" + load_prompt("agent_delegation") if may_delegate else "",
    )
    return [Message("system", role_prompt), Message("user", user_prompt)]


def answer_stops(messages: list[Message]) -> tuple[str, ...]:
    """Where an agent's answer ends: at a chat-template marker, and a document's answer where the document would go on."""
    if len(messages) == 1 and messages[0].role == "document":
        answer_label = messages[0].content.rsplit("\n", 1)[-1]
        return (*TEMPLATE_MARKERS, *DOCUMENT_STOP, f"\n{answer_label}")
    return TEMPLATE_MARKERS


def answer_budget(limits: Limits, role: str, style: PromptStyle) -> int:
    """Most tokens the agent's answer may have: --max-tokens when given, else its role's budget for its model's prompt style."""
    return limits.max_tokens or limits.answer_tokens.of(style).of_role(role)


class CallFailed(Exception):
    """The LLM call failed for good, after `attempts` tries."""

    def __init__(self, error: LLMError, attempts: int) -> None:
        super().__init__(str(error))
        self.attempts = attempts


def call_with_retries(llm: LLM, request: LLMRequest, retries: int) -> tuple[LLMResponse, int]:
    """Call the LLM, retrying transient errors and empty answers with exponential backoff and full jitter;
    returns the tries used."""
    retrying = Retrying(
        stop=stop_after_attempt(retries + 1),
        wait=wait_random_exponential(multiplier=BACKOFF_BASE_S, max=BACKOFF_MAX_S),
        retry=retry_if_exception(lambda error: isinstance(error, LLMError) and error.transient),
        reraise=True,
    )
    tries = 0

    def once() -> LLMResponse:
        nonlocal tries
        tries += 1
        response = complete(llm, replace(request, attempt=tries))
        if not finish_answer(valid_text(response.text))[0].strip():  # a sampled first token hit a stop: ask again
            raise LLMError("the model's answer was empty", transient=True)
        return response

    try:
        return retrying(once), tries
    except LLMError as error:
        raise CallFailed(error, tries) from error


def agent_record(context: AgentContext, **fields: object) -> AgentRecord:
    """The agent's record, as far as its context tells it, with `fields` set."""
    spec = context.spec
    return AgentRecord(
        id=context.agent_id,
        path=context.path,
        role=spec.role.value,
        task=spec.task,
        depends_on=spec.depends_on,
        layer=context.layer,
        submitted_at=context.submitted_at,
        **fields,  # type: ignore[arg-type]
    )


def run_agent(context: AgentContext, inputs: Sequence[AgentRecord], on_text: TextCallback | None = None) -> AgentRecord:
    """Do this agent's work; a failed call becomes a `failed` record, never an exception.

    `on_text` receives the answer as it streams, where the backend streams.
    """
    received = [result.id for result in inputs if result.status == "ok"]
    missing = [result.id for result in inputs if result.status != "ok"]
    result = agent_record(context, status="ok", inputs_from=received)
    if missing and context.limits.on_failure == "stop":
        result.status, result.error = "skipped", f"skipped: input from agent(s) {missing} is missing (--on-failure stop)"
        result.failure = FailureKind.INPUT_MISSING
        return result
    llm = get_llm(context.llm)
    may_delegate = context.may_delegate and llm.delegates
    style = llm.prompt_style
    messages = build_messages(context, inputs, may_delegate=may_delegate, style=style)
    request = LLMRequest(
        messages=messages,
        caller="agent",
        query=context.query,
        agent_id=context.agent_id,
        role=context.spec.role.value,
        task=context.spec.task,
        inputs_from=received,
        max_tokens=answer_budget(context.limits, context.spec.role.value, style),
        stop=answer_stops(messages),
        timeout=context.limits.call_timeout,
        may_delegate=may_delegate,
        on_text=on_text,
    )
    result.started_at = time.time()
    try:
        response, result.attempts = call_with_retries(llm, request, context.limits.retries)
        result.output, result.repetition_cut = finish_answer(valid_text(response.text))
        result.finish_reason = response.finish_reason
        result.llm_ms = response.llm_ms
        result.tokens = response.usage
        if may_delegate and response.text.strip().upper().startswith(DELEGATE):
            _delegate(context, inputs, llm, result)
    except CallFailed as failure:
        result.status, result.error, result.failure, result.attempts = "failed", str(failure), FailureKind.LLM, failure.attempts
    except LLMError as error:  # the sub-plan's coordinator call failed
        result.status, result.error, result.failure = "failed", str(error), FailureKind.LLM
    except Exception as error:  # a backend bug must fail this agent, not the whole run
        result.status, result.error, result.failure = "failed", f"{type(error).__name__}: {error}", FailureKind.BACKEND
        result.attempts = max(result.attempts, 1)
    if result.error is not None:
        result.error = valid_text(result.error)  # it may quote the server's own words
    result.finished_at = time.time()
    return result


def _delegate(context: AgentContext, inputs: Sequence[AgentRecord], llm: LLM, result: AgentRecord) -> None:
    """The agent asked for a team: plan its task as a sub-plan one level deeper, for the runtime to run."""
    sub_query = load_prompt("sub_query").format(task=context.spec.task, query=context.query, inputs=format_inputs(inputs))
    plan, coordinator = make_plan(
        sub_query,
        llm,
        max_agents=context.limits.max_agents,
        answer_tokens=context.limits.answer_tokens,
        depth=context.depth + 1,
        timeout=context.limits.call_timeout,
    )
    result.status, result.output, result.sub_run = "delegated", "", SubRunRecord.start(context.path, sub_query, plan)
    if coordinator.fallback:
        result.warnings.append(f"Agent {context.path}: the coordinator's sub-plan fell back: {coordinator.errors[-1]}")
