"""Query -> validated ExecutionPlan.

The coordinator LLM answers under the plan's JSON schema (structured output); its answer is still
validated here, since a model may ignore the schema. An invalid answer gets one retry with the
validation error fed back; a second failure gets a safe fallback plan and a warning, never a crash.
A call that got no answer for a transient reason (a 5xx, a cut connection, a timeout) is made once
more; a second such failure ends the run, since there is no plan.
The answer can be streamed to the caller as it is written (the runtime starts agents from it).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from pydantic import ValidationError

from .errors import MetaAgentError
from .events import Notice
from .llm import LLM, LLMError, LLMRequest, Message, TextCallback, Usage
from .llm.bounds import AnswerBudgets
from .plan import ExecutionPlan, JoinerDecision, clean_dependencies, explain, joiner_json_schema, plan_json_schema, too_many_agents
from .prompts import load_prompt
from .record import CoordinatorRecord, JoinerRecord, RunRecord, StructuredCallRecord
from .subjects import QueryShape
from .tracing import complete, plan_span

COORDINATOR_TRIES = 2
# The worked example shown last, by the request's shape: a small model copies the nearest example's
# shape (how many researchers, what each later agent depends on) more than any instruction.
LARGEST_EXAMPLE = 5  # subjects in the largest shaped example; longer lists get it
FOCUSED_SUBJECTS = 4  # lists up to this long get the request's purpose in each researcher's task
Answer = TypeVar("Answer")
JOINER_OUTPUT_CHARS = 600  # of each agent's output the joiner reads: enough to judge it, and a small model's context holds many


class CoordinatorError(MetaAgentError):
    """The coordinator's LLM call itself failed, so there is no plan to run."""

    exit_code = 1


def fallback_plan(query: str, depth: int = 0) -> ExecutionPlan:
    """A plan that always works: research the request, then answer it."""
    return ExecutionPlan.model_validate(
        {
            "description": "Fallback plan: research the request, then answer it",
            "agents": [
                {"role": "RESEARCHER", "task": f"Research what is needed to answer: {query}", "depends_on": []},
                {"role": "SYNTHESIZER", "task": "Answer the request using the research", "depends_on": [0]},
            ],
            "depth": depth,
        }
    )


def _json(text: str, what: str) -> Any:
    """An answer's JSON (`what` it should be: "a plan"); raises ValueError with a one-line reason."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    except RecursionError:
        raise ValueError(f"its JSON nests too deeply to be {what}") from None


def _parse(text: str, max_agents: int, depth: int) -> ExecutionPlan:
    """Validate the coordinator's answer; raises ValueError with a one-line reason."""
    data = _json(text, "a plan")
    if isinstance(data, dict):
        data = {**data, "depth": depth}
    try:
        plan = ExecutionPlan.model_validate(data)
    except ValidationError as error:
        raise ValueError(explain(error)) from None
    if (too_many := too_many_agents(len(plan.agents), max_agents)) is not None:
        raise ValueError(too_many)
    return plan


def coordinator_request(query: str, shape: QueryShape) -> str:
    """The user's request, with the subjects it enumerates named, so that every one gets an agent.

    The plan stays the LLM's: the subjects are a line of the prompt, and the schema and validation
    are the same whether or not the request enumerates any.
    """
    request = load_prompt("coordinator_user").format(query=query)
    subjects, purpose = shape.subjects, shape.purpose
    if subjects:
        # "Research Rust for web development", not rust on steel; in longer lists the repeated purpose
        # made the small model chain and drop researchers (five modes of transport: three researchers)
        focus = f" {purpose}" if purpose and len(subjects) <= FOCUSED_SUBJECTS else ""
        request += "\n" + load_prompt("coordinator_subjects").format(
            subjects="; ".join(subjects), researchers=", ".join(f'"Research {subject}{focus}"' for subject in subjects)
        )
    return request


def nearest_example(shape: QueryShape) -> str:
    """The worked example shaped like the request: as many subjects as it enumerates, or steps, or one subject.

    With all the general examples before it, the last example is the one a small model copies:
    given only those, two-subject requests copied the four-subject example's dependencies (the
    analyzer depending on agents after it: a cycle) and longer lists lost researchers.
    """
    if len(shape.subjects) >= 2:
        return load_prompt(f"coordinator_example/{min(len(shape.subjects), LARGEST_EXAMPLE)}_subjects")
    return load_prompt("coordinator_example/steps" if shape.steps else "coordinator_example/one_subject")


def coordinator_messages(query: str, max_agents: int) -> list[Message]:
    """The instructions and general examples (the same in every call: `cache_messages=1`), the nearest example, the request."""
    shape = QueryShape.of(query)
    return [
        Message("system", load_prompt("coordinator").format(max_agents=max_agents)),
        Message("system", nearest_example(shape)),
        Message("user", coordinator_request(query, shape)),
    ]


@dataclass(frozen=True)
class Coordinator:
    """The coordinator's call for one query under a run's settings; the planning route calls it with where its
    answer streams and who hears why an answer was rejected (`make_plan`)."""

    query: str
    llm: LLM
    max_agents: int
    answer_tokens: AnswerBudgets
    timeout: float | None

    def __call__(self, on_text: TextCallback | None, on_rejected: Callable[[str], None] | None) -> tuple[ExecutionPlan, CoordinatorRecord]:
        return make_plan(
            self.query,
            self.llm,
            max_agents=self.max_agents,
            answer_tokens=self.answer_tokens,
            on_text=on_text,
            on_rejected=on_rejected,
            timeout=self.timeout,
        )


@plan_span
def make_plan(
    query: str,
    llm: LLM,
    *,
    max_agents: int,
    answer_tokens: AnswerBudgets,
    depth: int = 0,
    on_text: TextCallback | None = None,
    on_rejected: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> tuple[ExecutionPlan, CoordinatorRecord]:
    """Ask the coordinator LLM for a plan that maximises parallelism; always returns a usable plan.

    The plan's token budget is `answer_tokens`' for the model's prompt style. `on_text` receives the
    answer as it streams, where the backend streams; `on_rejected` hears why an answer was rejected
    (before the retry or the fallback); `timeout` bounds each call, as an agent's.
    """
    record = CoordinatorRecord(attempts=0, started_at=time.time())
    try:
        plan = _structured_call(
            StructuredCall(
                caller="coordinator",
                query=query,
                messages=coordinator_messages(query, max_agents),
                schema=plan_json_schema(max_agents),
                retry_prompt="coordinator_retry",
                max_tokens=answer_tokens.of(llm.prompt_style).plan,
                timeout=timeout,
            ),
            llm,
            lambda text: _parse(text, max_agents, depth),
            record,
            on_text=on_text,
            on_rejected=on_rejected,
        )
    except LLMError as error:
        raise CoordinatorError(f"the coordinator's LLM call failed: {error}") from None
    if plan is not None:
        return plan, record
    plan = fallback_plan(query, depth)
    plan.add_warning(f"⚠️ The coordinator's plan was invalid {COORDINATOR_TRIES} times ({record.errors[-1]}); using a fallback plan")
    record.fallback = True
    return plan, record


@dataclass(frozen=True)
class StructuredCall:
    """One schema-constrained question to the coordinator's role: its messages, the schema, and the prompt that
    asks again after a rejected answer (with `{error}`)."""

    caller: str
    query: str
    messages: list[Message]
    schema: dict[str, Any]
    retry_prompt: str
    max_tokens: int
    timeout: float | None


def _structured_call(
    call: StructuredCall,
    llm: LLM,
    parse: Callable[[str], Answer],
    record: StructuredCallRecord,
    *,
    on_text: TextCallback | None = None,
    on_rejected: Callable[[str], None] | None = None,
) -> Answer | None:
    """Ask under `call.schema` and `parse` the answer (ValueError: rejected, asked once more with why);
    None when both answers were rejected. A call with no answer for a transient reason is made once
    more; an LLMError that stays is raised. `record` keeps the tries, errors, time and tokens."""
    messages = list(call.messages)
    for attempt in range(1, COORDINATOR_TRIES + 1):
        request = LLMRequest(
            messages=list(messages),
            caller=call.caller,
            query=call.query,
            json_schema=call.schema,
            max_tokens=call.max_tokens,
            attempt=attempt,
            on_text=on_text,
            cache_messages=1,
            timeout=call.timeout,
        )
        record.attempts = attempt
        try:
            response = complete(llm, request)
        except LLMError as error:
            if not error.transient or attempt == COORDINATOR_TRIES:
                raise
            record.errors.append(str(error))  # no answer (a 5xx, a cut connection, a timeout): asked again as it was
            if on_rejected is not None:
                on_rejected(str(error))
            continue
        record.llm_ms = (record.llm_ms or 0.0) + (response.llm_ms or 0.0)
        record.tokens = (record.tokens or Usage()) + (response.usage or Usage())
        record.finished_at = time.time()
        try:
            return parse(response.text)
        except ValueError as error:
            record.errors.append(str(error))
            if on_rejected is not None:
                on_rejected(str(error))
            messages += [Message("assistant", response.text), Message("user", load_prompt(call.retry_prompt).format(error=error))]
    return None


def planned_notice(plan: ExecutionPlan, record: CoordinatorRecord) -> Notice:
    """The line that says the coordinator is done: how many agents, after how many tries."""
    tries = "" if record.attempts == 1 else f" after {record.attempts} tries"
    return Notice(f"🧭 Coordinator planned {len(plan.agents)} agents{tries}")


@dataclass(frozen=True)
class Joiner:
    """The joiner: the coordinator's role reading a round's results, after each round while `replans` allow.

    It answers under `JoinerDecision`'s schema, through the coordinator's structured call (one retry
    with the reason). No valid answer, or a failed call, means no decision: the run finishes as it is.
    """

    llm: LLM
    replans: int  # --replan: how many rounds it may add
    max_agents: int  # new agents in one round
    max_total_agents: int  # agents of the whole run
    answer_tokens: AnswerBudgets
    timeout: float | None

    def may_replan(self, record: RunRecord) -> bool:
        """Whether a round is left to add after the record's rounds (the first is the coordinator's)."""
        return len(record.rounds) <= self.replans

    def __call__(self, record: RunRecord) -> tuple[ExecutionPlan | None, JoinerRecord]:
        """Judge the record's last round: the run's plan with the new agents after the old when it replans, else None."""
        judged = JoinerRecord(attempts=0, started_at=time.time())
        call = StructuredCall(
            caller="joiner",
            query=record.query,
            messages=joiner_messages(record, self.max_agents),
            schema=joiner_json_schema(self.max_agents),
            retry_prompt="joiner_retry",
            max_tokens=self.answer_tokens.of(self.llm.prompt_style).plan,
            timeout=self.timeout,
        )
        try:
            answer = _structured_call(call, self.llm, lambda text: parse_decision(text, record.plan, self.max_agents, self.max_total_agents), judged)
        except LLMError as error:
            judged.errors.append(f"its LLM call failed: {error}")
            answer = None
        judged.finished_at = time.time()
        if answer is None:
            return None, judged
        decision, plan = answer
        judged.decision, judged.reason = decision.decision, decision.reason
        return plan, judged


def joiner_messages(record: RunRecord, max_agents: int) -> list[Message]:
    """The joiner's instructions, then the request, the plan and every agent's result, one JSON object a line."""
    rounds = record.round_of()
    lines = []
    for agent in record.agents:
        result = {"output": _shortened(agent.output)} if agent.status == "ok" else {"error": agent.error or agent.status}
        line = {"id": agent.id, "round": rounds[agent.id], "role": agent.role, "task": agent.task, "depends_on": agent.depends_on}
        lines.append(json.dumps({**line, "status": agent.status, **result}, ensure_ascii=False))
    user = load_prompt("joiner_user").format(
        query=record.query, description=record.plan.description, agents="\n".join(lines), next_id=len(record.agents)
    )
    return [Message("system", load_prompt("joiner").format(max_agents=max_agents)), Message("user", user)]


def _shortened(text: str) -> str:
    return text if len(text) <= JOINER_OUTPUT_CHARS else text[: JOINER_OUTPUT_CHARS - 1] + "…"


def parse_decision(text: str, plan: ExecutionPlan, max_agents: int, max_total_agents: int) -> tuple[JoinerDecision, ExecutionPlan | None]:
    """Validate the joiner's answer; for a replan, the run's plan with the new agents numbered after the old.

    A new agent's dependency on no earlier agent (itself, a later one, one that does not exist) is
    dropped with a warning, as a plan's are: so new agents never form a cycle nor change the old ones.
    Raises ValueError with a one-line reason.
    """
    data = _json(text, "a decision")
    if not isinstance(data, dict):
        raise ValueError("the decision must be a JSON object with 'decision', 'reason' and 'agents'")
    try:
        decision = JoinerDecision.model_validate(data)
    except ValidationError as error:
        raise ValueError(explain(error)) from None
    if decision.decision == "finish":
        return decision, None
    if (too_many := too_many_agents(len(decision.agents), max_agents)) is not None:
        raise ValueError(too_many)
    total = len(plan.agents) + len(decision.agents)
    if total > max_total_agents:
        raise ValueError(f"the run would have {total} agents, more than --max-total-agents {max_total_agents}")
    warnings = []
    new = []
    for index, spec in enumerate(decision.agents, start=len(plan.agents)):
        depends_on, dropped = clean_dependencies(index, spec.depends_on, index + 1)  # the agents before it, and itself
        if dropped:
            warnings.append(f"Agent {index}: dropped dependencies {', '.join(dropped)}: a new agent depends only on agents before it")
        new.append(spec.model_copy(update={"depends_on": depends_on}))
    extended = ExecutionPlan(description=plan.description, agents=[*plan.agents, *new], depth=plan.depth)
    for warning in warnings:
        extended.add_warning(warning)
    return decision, extended
