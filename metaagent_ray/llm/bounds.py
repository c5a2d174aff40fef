"""What holds every answer to a size and a shape, whichever backend serves it.

A model that never ends its answer (a base model continuing its prompt, a model served with the
wrong chat template) runs on to the server's context: thousands of tokens of prompt echo, chat
template markers and loops. So every request carries a token budget (by the model's prompt style
and what it answers: the coordinator's plan or an agent's role, `AnswerBudgets`, whose defaults the
run settings hold) and stops at the chat-template markers (`LLMRequest.stop`); every agent's answer
is cut at a marker that still got through and before its first repeated sentence (`finish_answer`).
The backends only pass the budget and the stops on to their servers, each in its API's words.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, PositiveInt, model_validator

from ..plan import Role

if TYPE_CHECKING:  # base.py takes its default stops from here
    from .base import PromptStyle

# The turn markers of the common chat templates (ChatML, Gemma, Llama 2 and 3, Phi, Mistral), and the
# end-of-text tokens written out as text: none belongs in an answer, and what follows one is a new
# turn the model invents (the prompt echoed, "<|im_start|>assistant\nThe user's request: ...").
TEMPLATE_MARKERS = (
    "<|im_end|>",
    "<|im_start|>",
    "<end_of_turn>",
    "<start_of_turn>",
    "</s>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|endoftext|>",
    "<|end|>",
    "<|user|>",
    "<|assistant|>",
    "[INST]",
    "[/INST]",
)
_MARKER = re.compile("|".join(re.escape(marker) for marker in TEMPLATE_MARKERS))
_TURN_ROLE = re.compile(r"\s*(?:system|user|assistant|model)\b[ \t]*(?:\n|$)")  # what a marker's turn starts with
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")
MIN_REPEATED_WORDS = 4  # shorter repeats ("- Fast.", "Yes.") can be meant


class AnswerBudget(BaseModel):
    """Most tokens one answer may have, for one prompt style: the coordinator's plan, and an agent's answer by its role."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plan: PositiveInt
    roles: dict[Role, PositiveInt]

    @model_validator(mode="after")
    def _every_role(self) -> AnswerBudget:
        missing = [role.value for role in Role if role not in self.roles]
        if missing:
            raise ValueError(f"no answer budget for the role(s) {', '.join(missing)}")
        return self

    def of_role(self, role: str) -> int:
        return self.roles[Role(role)]


class AnswerBudgets(BaseModel):
    """The answer budgets of instruct models ("chat", which end their answers themselves: these only stop
    one that runs on) and of base models ("document", which write until stopped: a paragraph each)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chat: AnswerBudget
    document: AnswerBudget

    def of(self, style: PromptStyle) -> AnswerBudget:
        return self.chat if style == "chat" else self.document


def strip_markers(text: str) -> str:
    """The answer up to the first chat-template marker after its text; markers before any text are
    dropped, with the role name on the line of the turn they open ("<start_of_turn>model")."""
    for index, piece in enumerate(_MARKER.split(text)):
        answer = _TURN_ROLE.sub("", piece, count=1) if index > 0 and _TURN_ROLE.match(piece) else piece
        if answer.strip():
            return answer.strip()
    return ""


def cut_repetition(text: str) -> tuple[str, bool]:
    """The answer up to its first repeated paragraph or sentence, and whether it was cut.

    Small models loop: they write a paragraph or a sentence again and again until the token limit.
    A repeat tells the reader nothing new, so the answer ends before it.
    """
    seen: set[str] = set()
    for match in _SENTENCE.finditer(text):
        sentence = " ".join(match.group().lower().split())
        if len(sentence.split()) < MIN_REPEATED_WORDS:
            continue
        if sentence in seen:
            return text[: match.start()].rstrip(), True
        seen.add(sentence)
    return text, False


def finish_answer(text: str) -> tuple[str, bool]:
    """An agent's answer as it is kept: cut at a template marker that got past the stops, then before
    its first repeat; and whether a repeat was cut."""
    return cut_repetition(strip_markers(text))
