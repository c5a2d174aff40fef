"""How many LLM calls one node can serve at once: its `llm_slot` Ray resource.

The count comes from what the node has (free RAM, CPU cores, GPUs) and what one LLM instance costs
there (its footprint), and every step of the reasoning is kept as a line a person can check:

- every slot is a Ray worker process (WORKER_BYTES) plus, for backends that run the model inside
  the worker, one model instance; RAM bound = (free RAM - headroom - memory shared by all
  instances) / (worker + instance);
- `local` (llama.cpp on the CPU): the GGUF file is memory-mapped, so the kernel keeps one copy of
  the weights for all instances (shared); each instance adds the measured overhead and its context
  (KV) cache. llama.cpp is CPU-bound here, so cores / threads per instance bound the slots as well;
- `ollama`: the server loads one copy of the model for every request and answers at most
  OLLAMA_NUM_PARALLEL requests at once (each with its own context cache, sized by the server);
  further requests only queue there. That number bounds the slots; the model's size and the GPUs
  are reported, since they decide where the server can put the model, not how many agents wait;
- `fake`: no model; a settable size per instance (option `model_mb`) for trying the formula.

The result is min(bounds, MAX_SLOTS), and at least 1: a run needs one slot to make progress.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import psutil
from pydantic import BaseModel

from .llm import LLMConfig, create_llm, fake, local, ollama
from .llm.auto import resolve_auto

MiB = 1024**2
GiB = 1024**3
MB = 1000**2

SLOT_RESOURCE = "llm_slot"
MAX_SLOTS = 64  # no plan may have more agents than this by default (api.DEFAULT_MAX_AGENTS)
HEADROOM_MIN_BYTES = 2 * GiB  # RAM left to the OS, Ray's own processes and the driver ...
HEADROOM_FRACTION = 0.10  # ... or this share of all RAM, whichever is larger

# Measured on 2026-11-29 with `python benchmarks/memory.py` (Ray 2.60, llama-cpp-python 0.3.36,
# Gemma 3 270M Q4_K_M, 1 thread, 2-core x86 machine); the README holds the table.
WORKER_BYTES = 68 * MiB  # anonymous memory (RssAnon) of an idle Ray worker with metaagent_ray imported
# What a llama.cpp instance adds to its worker's anonymous memory beyond its KV cache (its weights
# are file pages of the mapped GGUF, shared): ~85 MiB of buffers once loaded, and ~185 MiB that the
# first grammar-constrained call leaves behind (it stays, but does not grow with more calls or other
# schemas). Growth after the schema call minus the KV cache was 267, 269 and 280 MiB at n_ctx 2048,
# 4096 and 8192; the largest is used.
LOCAL_OVERHEAD_BYTES = 280 * MiB
KV_BYTES_PER_ELEMENT = 2  # llama.cpp's default cache type is f16

NVIDIA_SMI_QUERY = ["--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"]
CGROUP_ROOT = Path("/sys/fs/cgroup")  # cgroup v2 as a container sees it (Docker, Kubernetes)


class GPU(BaseModel):
    """One NVIDIA GPU as nvidia-smi reports it."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int


class NodeCapacity(BaseModel):
    """What this node has for LLM instances, within its container's limits."""

    total_ram_bytes: int
    free_ram_bytes: int  # what can be allocated without swapping (page cache counts as free)
    cpu_count: int
    gpus: list[GPU] = []
    gpu_note: str = ""  # why no GPU was found, when none was


class ModelFootprint(BaseModel):
    """What one LLM instance of a backend costs on this node, and the rules that bound its slots."""

    source: str  # where the figures come from, in words
    instance_bytes: int  # RAM each instance adds inside its Ray worker
    shared_bytes: int = 0  # RAM needed once for all instances (memory-mapped weights)
    threads_per_instance: int | None = None  # CPU-bound backends: cores / threads bound the slots
    server_parallel: int | None = None  # a server that answers at most this many requests at once
    server_parallel_reason: str = ""
    gpu_model_bytes: int | None = None  # a model a GPU would hold; None: the backend uses no GPU
    gpu_unused_reason: str = ""


class SlotPlan(BaseModel):
    """The slot count for a node and the reasoning behind it, one human line per step."""

    slots: int
    reasons: list[str]


def size(value: float) -> str:
    """Bytes as MiB below 1 GiB, else GiB."""
    return f"{value / MiB:.0f} MiB" if abs(value) < GiB else f"{value / GiB:.1f} GiB"


# --- what the node has ---------------------------------------------------------------------------


def parse_nvidia_smi(text: str) -> list[GPU]:
    """GPUs from `nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader,nounits`.

    Memory is in MiB; a GPU that reports no memory figure ("[N/A]", e.g. under MIG) is left out.
    """
    gpus = []
    for line in filter(None, (line.strip() for line in text.splitlines())):
        index, *name, total, free = (part.strip() for part in line.split(","))
        if not (index.isdigit() and total.isdigit() and free.isdigit()):
            continue
        gpus.append(GPU(index=int(index), name=",".join(name), total_bytes=int(total) * MiB, free_bytes=int(free) * MiB))
    return gpus


def find_gpus() -> tuple[list[GPU], str]:
    """This node's NVIDIA GPUs, and why there are none when there are none."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return [], "no nvidia-smi on PATH"
    try:
        result = subprocess.run([binary, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as error:
        return [], f"nvidia-smi failed ({type(error).__name__})"
    gpus = parse_nvidia_smi(result.stdout)
    return gpus, "" if gpus else "nvidia-smi lists no GPU with a memory figure"


def _cgroup_memory(root: Path) -> tuple[int, int] | None:
    """(limit, used) of a cgroup v2 memory limit, used without file cache (as Ray counts it); None without a limit."""
    try:
        limit = (root / "memory.max").read_text().strip()
        current = int((root / "memory.current").read_text())
        stat = dict(line.split() for line in (root / "memory.stat").read_text().splitlines())
    except (OSError, ValueError):
        return None
    if not limit.isdigit():  # "max": no limit
        return None
    return int(limit), current - int(stat.get("active_file", 0)) - int(stat.get("inactive_file", 0))


def _cgroup_cpus(root: Path) -> int | None:
    """Whole CPUs a cgroup v2 quota allows (at least 1); None without a quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return max(1, int(quota) // int(period)) if quota.isdigit() and period.isdigit() else None


def node_capacity(cgroup_root: Path = CGROUP_ROOT) -> NodeCapacity:
    """This node's RAM, cores and GPUs, within a container's cgroup limits when it has them."""
    memory = psutil.virtual_memory()
    total, free = memory.total, memory.available
    limited = _cgroup_memory(cgroup_root)
    if limited is not None:
        limit, used = limited
        total, free = min(total, limit), min(free, max(0, limit - used))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpus(cgroup_root)
    gpus, gpu_note = find_gpus()
    return NodeCapacity(
        total_ram_bytes=total,
        free_ram_bytes=free,
        cpu_count=min(cpus, quota) if quota else cpus,
        gpus=gpus,
        gpu_note=gpu_note,
    )


# --- what one instance costs ---------------------------------------------------------------------

_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # struct codes
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_value(file: BinaryIO, kind: int) -> Any:
    """One metadata value; arrays of strings (the vocabulary) are skipped and read as None."""
    if kind in _GGUF_SCALARS:
        code = _GGUF_SCALARS[kind]
        return struct.unpack(f"<{code}", file.read(struct.calcsize(code)))[0]
    if kind == _GGUF_STRING:
        (length,) = struct.unpack("<Q", file.read(8))
        return file.read(length).decode("utf-8", errors="replace")
    if kind == _GGUF_ARRAY:
        item_kind, count = struct.unpack("<IQ", file.read(12))
        if item_kind in _GGUF_SCALARS:
            code = f"{count}{_GGUF_SCALARS[item_kind]}"
            return list(struct.unpack(f"<{code}", file.read(struct.calcsize(code))))
        if item_kind == _GGUF_STRING:
            for _ in range(count):
                (length,) = struct.unpack("<Q", file.read(8))
                file.seek(length, os.SEEK_CUR)
            return None
        return [_gguf_value(file, item_kind) for _ in range(count)]
    raise ValueError(f"unknown GGUF value type {kind}")


def _gguf_items(file: BinaryIO) -> Iterator[tuple[str, Any]]:
    """The key-value metadata at the head of a GGUF file (version 2 or 3), in file order."""
    magic, version, _tensors, count = struct.unpack("<4sIQQ", file.read(24))
    if magic != b"GGUF" or version < 2:
        raise ValueError("not a GGUF v2+ file")
    for _ in range(count):
        (length,) = struct.unpack("<Q", file.read(8))
        key = file.read(length).decode("utf-8", errors="replace")
        (kind,) = struct.unpack("<I", file.read(4))
        yield key, _gguf_value(file, kind)


def kv_bytes_per_token(path: Path) -> tuple[int, str] | None:
    """The context (KV) cache one token takes, from the model's GGUF metadata, and how it was computed.

    llama.cpp keeps a key and a value vector per layer and KV head: layers x KV heads x (key length +
    value length) x 2 bytes (f16). benchmarks/memory.py confirms it for Gemma 3 270M (18 KiB per
    token). None when the metadata does not describe an attention cache.
    """
    try:
        with path.open("rb") as file:
            metadata = dict(_gguf_items(file))
    except (OSError, ValueError, struct.error):
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


def local_footprint(config: LLMConfig) -> ModelFootprint:
    """The GGUF weights once (mapped, shared) + per instance: measured overhead + its KV cache at n_ctx."""
    llm = local.create(config)
    path, n_ctx, threads = llm.model_path(), llm.options.n_ctx, llm.options.n_threads
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
            f"local {path.name}: {size(weights)} of weights, memory-mapped once for all instances; each "
            f"instance adds {size(LOCAL_OVERHEAD_BYTES)} (measured, benchmarks/memory.py) + {cache}"
        ),
        instance_bytes=LOCAL_OVERHEAD_BYTES + cache_bytes,
        shared_bytes=weights,
        threads_per_instance=threads,
        gpu_unused_reason="the local backend runs llama.cpp on the CPU",
    )


def ollama_parallel() -> tuple[int, str]:
    """How many requests the Ollama server answers at once, as far as this environment can tell."""
    value = os.environ.get("OLLAMA_NUM_PARALLEL", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value), f"OLLAMA_NUM_PARALLEL={value} here (the server's own setting is what counts: start it with the same)"
    return 1, (
        "OLLAMA_NUM_PARALLEL is not set here: an Ollama server answers 1 request per model at a time by default, "
        "and further requests only queue there (start `ollama serve` with OLLAMA_NUM_PARALLEL=N, and set it here too)"
    )


def ollama_footprint(config: LLMConfig) -> ModelFootprint:
    """The server holds the model once, whatever the slot count; its parallelism bounds the slots."""
    llm = ollama.create(config)
    model_bytes = llm.model_size_bytes()
    parallel, why = ollama_parallel()
    return ModelFootprint(
        source=(
            f"ollama {llm.model} at {llm.host}: {size(model_bytes)} as the server reports it, loaded once by the "
            "server for every request; each parallel request adds a context cache the server sizes itself"
        ),
        instance_bytes=0,
        server_parallel=parallel,
        server_parallel_reason=why,
        gpu_model_bytes=model_bytes,
    )


def fake_footprint(config: LLMConfig) -> ModelFootprint:
    """No model; option `model_mb` (default 0) pretends each instance holds one of that size."""
    model_mb = fake.create(config).options.model_mb
    return ModelFootprint(
        source=f"fake: {model_mb:g} MB per instance (option model_mb)",
        instance_bytes=int(model_mb * MB),
        gpu_unused_reason="the fake backend runs no model",
    )


FOOTPRINTS: dict[str, Callable[[LLMConfig], ModelFootprint]] = {
    "local": local_footprint,
    "ollama": ollama_footprint,
    "fake": fake_footprint,
}


def model_footprint(config: LLMConfig) -> ModelFootprint:
    """The footprint of a concrete backend; one this module does not know costs only its Ray workers."""
    footprint = FOOTPRINTS.get(config.backend)
    if footprint is None:
        create_llm(config)  # an unknown name or bad options fail here, with the registry's message
        return ModelFootprint(
            source=f"{config.backend}: no model footprint known for this backend; only its Ray workers are counted",
            instance_bytes=0,
            gpu_unused_reason=f"the {config.backend} backend reports no GPU use",
        )
    return footprint(config)


# --- the count -----------------------------------------------------------------------------------


def _gpu_lines(capacity: NodeCapacity, footprint: ModelFootprint) -> list[str]:
    if not capacity.gpus:
        return [f"GPU: none ({capacity.gpu_note or 'none found'})"]
    lines = []
    for gpu in capacity.gpus:
        head = f"GPU {gpu.index} ({gpu.name}, {size(gpu.free_bytes)} free of {size(gpu.total_bytes)})"
        if footprint.gpu_model_bytes is None:
            lines.append(f"{head}: not used: {footprint.gpu_unused_reason}")
        elif gpu.free_bytes >= footprint.gpu_model_bytes:
            lines.append(f"{head}: can hold the {size(footprint.gpu_model_bytes)} model")
        else:
            lines.append(f"{head}: too small for the {size(footprint.gpu_model_bytes)} model alone; the server splits it with the CPU")
    return lines


def plan_slots(capacity: NodeCapacity, footprint: ModelFootprint, *, cap: int = MAX_SLOTS) -> SlotPlan:
    """min(RAM bound, CPU bound, server bound, cap), at least 1, with a line for every step."""
    gpus = ", ".join(gpu.name for gpu in capacity.gpus) or "no GPU"
    reasons = [
        f"Node: {size(capacity.free_ram_bytes)} of {size(capacity.total_ram_bytes)} RAM free, {capacity.cpu_count} CPU cores, {gpus}",
        f"Model: {footprint.source}",
    ]
    headroom = max(HEADROOM_MIN_BYTES, int(capacity.total_ram_bytes * HEADROOM_FRACTION))
    usable = capacity.free_ram_bytes - headroom - footprint.shared_bytes
    per_slot = WORKER_BYTES + footprint.instance_bytes
    bounds = {"RAM": max(0, usable // per_slot)}
    shared = f" - {size(footprint.shared_bytes)} shared weights" if footprint.shared_bytes else ""
    reasons.append(
        f"RAM: {size(capacity.free_ram_bytes)} free - {size(headroom)} headroom{shared} = {size(usable)} / "
        f"{size(per_slot)} per slot (Ray worker {size(WORKER_BYTES)} + instance {size(footprint.instance_bytes)}) = {bounds['RAM']}"
    )
    if footprint.threads_per_instance:
        threads = footprint.threads_per_instance
        bounds["CPU"] = capacity.cpu_count // threads
        reasons.append(f"CPU: {capacity.cpu_count} cores / {threads} thread{'s' if threads != 1 else ''} per instance = {bounds['CPU']}")
    if footprint.server_parallel:
        bounds["server"] = footprint.server_parallel
        reasons.append(f"Server: {footprint.server_parallel_reason} = {footprint.server_parallel}")
    reasons += _gpu_lines(capacity, footprint)
    bounds["cap"] = cap
    smallest = min(bounds.values())
    slots = max(1, smallest)
    terms = ", ".join(f"{name} {value}" for name, value in bounds.items())
    short = " -> 1 anyway: a run needs one slot (expect swapping, or free memory)" if smallest < 1 else ""
    reasons.append(f"Slots: min({terms}) = {smallest}{short}")
    return SlotPlan(slots=slots, reasons=reasons)


def default_slots(config: LLMConfig, capacity: NodeCapacity | None = None) -> SlotPlan:
    """The slot plan for this node and backend config (`auto` is resolved first, as a run does)."""
    choice = []
    if config.backend == "auto":
        config, why = resolve_auto(config)
        choice = [f"Backend: {config.backend}, because {why}"]
    plan = plan_slots(capacity or node_capacity(), model_footprint(config))
    return SlotPlan(slots=plan.slots, reasons=[*choice, *plan.reasons])


def node_resources_json(plan: SlotPlan) -> str:
    """The custom resources for `ray start --resources '<json>'` on a cluster node."""
    return json.dumps({SLOT_RESOURCE: plan.slots})
