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
from typing import Callable

from pydantic import ValidationError

from .errors import MetaAgentError
from .events import Notice
from .llm import LLM, LLMError, LLMRequest, Message, TextCallback, Usage
from .llm.bounds import AnswerBudgets
from .plan import ExecutionPlan, explain, plan_json_schema, too_many_agents
from .prompts import load_prompt
from .record import CoordinatorRecord
from .subjects import QueryShape
from .tracing import complete, plan_span

COORDINATOR_TRIES = 2
# The worked example shown last, by the request's shape: a small model copies the nearest example's
# shape (how many researchers, what each later agent depends on) more than any instruction.
LARGEST_EXAMPLE = 5  # subjects in the largest shaped example; longer lists get it
FOCUSED_SUBJECTS = 4  # lists up to this long get the request's purpose in each researcher's task


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


def _parse(text: str, max_agents: int, depth: int) -> ExecutionPlan:
    """Validate the coordinator's answer; raises ValueError with a one-line reason."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    except RecursionError:
        raise ValueError("its JSON nests too deeply to be a plan") from None
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
    messages = coordinator_messages(query, max_agents)
    schema = plan_json_schema(max_agents)
    record = CoordinatorRecord(attempts=0, started_at=time.time())
    llm_ms = 0.0
    tokens = Usage()
    for attempt in range(1, COORDINATOR_TRIES + 1):
        request = LLMRequest(
            messages=list(messages),
            caller="coordinator",
            query=query,
            json_schema=schema,
            max_tokens=answer_tokens.of(llm.prompt_style).plan,
            attempt=attempt,
            on_text=on_text,
            cache_messages=1,
            timeout=timeout,
        )
        record.attempts = attempt
        try:
            response = complete(llm, request)
        except LLMError as error:
            if not error.transient or attempt == COORDINATOR_TRIES:
                raise CoordinatorError(f"the coordinator's LLM call failed: {error}") from None
            record.errors.append(str(error))  # no answer (a 5xx, a cut connection, a timeout): asked again as it was
            if on_rejected is not None:
                on_rejected(str(error))
            continue
        llm_ms += response.llm_ms or 0.0
        tokens += response.usage or Usage()
        record.llm_ms, record.tokens = llm_ms, tokens
        record.finished_at = time.time()
        try:
            return _parse(response.text, max_agents, depth), record
        except ValueError as error:
            record.errors.append(str(error))
            if on_rejected is not None:
                on_rejected(str(error))
            messages += [Message("assistant", response.text), Message("user", load_prompt("coordinator_retry").format(error=error))]
    plan = fallback_plan(query, depth)
    plan.add_warning(f"⚠️ The coordinator's plan was invalid {COORDINATOR_TRIES} times ({record.errors[-1]}); using a fallback plan")
    record.fallback = True
    return plan, record


def planned_notice(plan: ExecutionPlan, record: CoordinatorRecord) -> Notice:
    """The line that says the coordinator is done: how many agents, after how many tries."""
    tries = "" if record.attempts == 1 else f" after {record.attempts} tries"
    return Notice(f"🧭 Coordinator planned {len(plan.agents)} agents{tries}")
