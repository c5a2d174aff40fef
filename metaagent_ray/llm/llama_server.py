"""What llama.cpp's server must be told, whoever calls it: the `local` backend (its own server, in
process) and the `openai` backend (a llama-server the user runs, found by its `/props`).

A model without a chat template (the default Gemma 3 270M is a base model) gets no chat request:
llama.cpp would wrap it in its built-in ChatML fallback, which the model does not know, and it
answers with template markers and an echo of its prompt. It gets a document to continue over
`/v1/completions` instead: an agent's own document prompt as it is (prompts/document/), any other
request as plain sections that end where the answer starts. JSON schemas go in the form the
server's decoder keeps to: closed objects, on one line.
"""

from __future__ import annotations

from typing import Any

from .base import LLMRequest, Message

_SECTION = {"system": "### Instructions", "user": "### Request", "assistant": "### Response"}
# A plain prompt's answer ends where the model starts a new section of that document on its own.
PLAIN_STOP = tuple(f"\n{header}" for header in _SECTION.values())
# JSON answers on one line with fixed separators (LLGuidance's options for the schema): given free
# whitespace, the small model drifts into newlines and endless lists of numbers, and runs out of tokens.
ONE_LINE_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# llama.cpp's own template for a model that has none (CHATML_TEMPLATE_SRC in its common/chat.cpp):
# its server reports it in /props as the model's `chat_template`.
CHATML_FALLBACK = (
    "{%- for message in messages -%}\n"
    "  {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\n' -}}\n"
    "{%- endif -%}"
)


def lacks_chat_template(props: Any) -> bool:
    """Whether `props`, a server's answer to `GET /props`, is llama.cpp's for a model without a chat
    template of its own: its `chat_template` empty, or llama.cpp's fallback."""
    template = props.get("chat_template") if isinstance(props, dict) else None
    return isinstance(template, str) and "".join(template.split()) in ("", "".join(CHATML_FALLBACK.split()))


def completion_prompt(request: LLMRequest) -> tuple[str, tuple[str, ...]]:
    """The text a model without a chat template continues for `request`, and the stops that text needs
    besides the request's own: an agent's document as it is (its stops come with the request), other
    messages as plain sections."""
    if len(request.messages) == 1 and request.messages[0].role == "document":
        return request.messages[0].content, ()
    return plain_prompt(request.messages), PLAIN_STOP


def json_schema_field(schema: dict[str, Any]) -> dict[str, Any]:
    """The `json_schema` field of a request to llama.cpp's server: closed objects, decoded on one line."""
    return {**closed_objects(schema), "x-guidance": ONE_LINE_JSON}


def closed_objects(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object that does not say otherwise.

    The server's JSON-schema decoder (LLGuidance) follows the spec, under which an object admits any
    extra key: a small model then wanders into keys of its own and never closes the object. A plan
    has exactly the keys its schema names, as llama.cpp's GBNF converter assumed.
    """
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: value if key in ("enum", "const") else closed_objects(value) for key, value in schema.items()}
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


def plain_prompt(messages: list[Message]) -> str:
    """A document prompt for models without a chat template, ending where the answer starts."""
    return "\n\n".join([*_plain_sections(messages), _SECTION["assistant"]]) + "\n"


def shared_prefix(request: LLMRequest, chat_template: bool) -> str | None:
    """The prompt text of the request's shared leading messages (`cache_messages`), which every such
    prompt starts with; None when there are none or the server renders the prompt (chat templates)."""
    if not request.cache_messages or chat_template or request.messages[0].role == "document":
        return None
    return "\n\n".join(_plain_sections(request.messages[: request.cache_messages])) + "\n\n"


def _plain_sections(messages: list[Message]) -> list[str]:
    """One section per message under its header; system messages in a row share one section."""
    sections: list[str] = []
    for index, message in enumerate(messages):
        if message.role == "system" and index > 0 and messages[index - 1].role == "system":
            sections[-1] += f"\n\n{message.content.strip()}"
        else:
            sections.append(f"{_SECTION.get(message.role, _SECTION['user'])}\n{message.content.strip()}")
    return sections
