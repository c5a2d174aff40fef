"""Streamed answers in the OpenAI form (server-sent events), as llama.cpp's server, vLLM and OpenAI
send them: one reader for the `openai` and `local` backends, whichever way they read their lines.

Each event is a line `data: {json}`; the stream ends with `data: [DONE]`, so a stream without it was
cut off mid-answer. A chat answer arrives as each choice's `delta`, a completion's as its `text`;
the token usage comes in an event of its own when the request asks for it (`stream_options`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

DONE = "data: [DONE]"


class MalformedStream(ValueError):
    """An event that is not the JSON of a completion chunk."""


@dataclass
class AnswerStream:
    """One streamed answer, fed a line at a time: its text so far, token usage and why it ended."""

    text: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    finish_reason: str | None = None
    done: bool = False  # the closing [DONE] came: the answer is whole

    def feed(self, line: str) -> str:
        """Read one line of the stream; returns the piece of answer it adds ("" for none).

        Raises MalformedStream for an event that is not the JSON of a completion chunk.
        """
        if line.strip() == DONE:
            self.done = True
        if self.done or not line.startswith("data:"):
            return ""
        try:
            event = json.loads(line.removeprefix("data:"))
            self.usage = event.get("usage") or self.usage
            piece = ""
            for choice in event.get("choices") or []:
                piece += ((choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")) or ""
                self.finish_reason = choice.get("finish_reason") or self.finish_reason
        except (ValueError, AttributeError, TypeError) as error:  # not JSON, or JSON of another shape
            raise MalformedStream(f"not a completion chunk ({type(error).__name__}: {error})") from None
        self.text += piece
        return piece
