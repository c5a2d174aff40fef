"""The subjects a request enumerates ("A, B, and C", "X: a, b, c", "A vs B"), found without an LLM.

The coordinator is told them, so even a tiny model plans one agent per subject; the fake backend
plans from them; the quality benchmark measures plan coverage against them. A request that is
sequential ("X, then Y") enumerates steps, not subjects, and has none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_INTRO = re.compile(
    r"\b(?:compare|comparing|contrast|evaluate|evaluating|review|research|analy[sz]e|assess|covering|cover|with|between|including|of)\s+(.+)",
    re.IGNORECASE,
)
_SEQUENTIAL = re.compile(r"\b(?:then|use (?:that|this|it)|based on|after that|afterwards)\b", re.IGNORECASE)
_TOPIC_TAIL = re.compile(r"\s+((?:for|in|on|as|to|across|when)\s+.+)$", re.IGNORECASE)
_SEPARATORS = re.compile(r",|;|&|\band\b|\bor\b|\bvs\.?|\bversus\b", re.IGNORECASE)
_ARTICLE = re.compile(r"^(?:the|a|an)\s+", re.IGNORECASE)
MAX_SUBJECT_WORDS = 5


def sequential(query: str) -> bool:
    """Whether the request asks for steps in order ("X, then Y"), which enumerate no subjects."""
    return bool(_SEQUENTIAL.search(query))


@dataclass(frozen=True)
class QueryShape:
    """What a request enumerates, read once: its subjects, what they are for, or that it asks for steps."""

    subjects: list[str] = field(default_factory=list)
    purpose: str = ""  # "for web development"
    steps: bool = False  # "X, then Y": steps in order, no subjects

    @classmethod
    def of(cls, query: str) -> QueryShape:
        if sequential(query):
            return cls(steps=True)
        subjects, purpose = enumerated_subjects(query)
        return cls(subjects, purpose)


def enumerated_subjects(query: str) -> tuple[list[str], str]:
    """The subjects a request lists, in order, and what they are for ("for web development"), or ([], "")."""
    text = " ".join(query.split()).rstrip(" .?!")
    if sequential(text):
        return [], ""
    if ":" in text:
        body = text.split(":", 1)[1]
    elif match := _INTRO.search(text):
        body = match.group(1)
    elif re.search(r"\b(?:vs\.?|versus)\s", text, re.IGNORECASE):
        body = text
    else:
        return [], ""
    topic = ""
    if tail := _TOPIC_TAIL.search(body):
        body, topic = body[: tail.start()], tail.group(1)
    parts = [_ARTICLE.sub("", part.strip()) for part in _SEPARATORS.split(body)]
    subjects = [part for part in parts if part]
    if len(subjects) < 2 or any(len(subject.split()) > MAX_SUBJECT_WORDS for subject in subjects):
        return [], ""
    return subjects, topic
