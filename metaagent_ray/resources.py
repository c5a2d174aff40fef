"""How many LLM calls one node can serve at once: its `llm_slot` Ray resource.

The count comes from what the node has (free RAM, CPU cores, GPUs) and what one LLM instance costs
there (its footprint), and every step of the reasoning is kept as a line a person can check:

- every slot is a Ray worker process (WORKER_BYTES) plus what the model needs per slot; RAM bound =
  (free RAM - headroom - memory shared by all slots) / (worker + per slot);
- `local` (llama.cpp's server on the CPU, one per node, local_server.py): the weights (a mapped
  GGUF file) and the server's buffers count once; each parallel slot adds its context (KV) cache.
  The slots of one server decode in shared batches, so each core serves several (LOCAL_SLOTS_PER_CORE);
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
from typing import Callable

import psutil
from pydantic import BaseModel

from .llm import LLMConfig, create_llm, fake, local, ollama
from .llm.auto import resolve_auto
from .llm.gguf import read_metadata

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
# The local backend's server (xllamacpp 2026.10, same model and machine, `python benchmarks/local_engines.py`):
# anonymous memory after a plain and a schema-constrained call per slot, the weights being file pages.
# 271 MiB with 1 slot, 633 MiB with 8: 52 MiB per further slot, less than the 72 MiB the KV formula
# gives at n_ctx 4096 (Gemma 3's sliding-window layers keep fewer tokens), so a slot counts as its KV cache.
LOCAL_SERVER_BYTES = 219 * MiB  # the server's own buffers: 271 MiB with one slot, minus that slot
# Parallel slots one core serves: the server's throughput still grew from 4 to 8 agents on 2 cores
# (5.8 to 16.3 tokens/s on the loaded machine, README), while each slot costs only its KV cache.
LOCAL_SLOTS_PER_CORE = 4
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
    slots_per_core: int | None = None  # CPU-bound backends: cores x this bound the slots
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


def kv_bytes_per_token(path: Path) -> tuple[int, str] | None:
    """The context (KV) cache one token takes, from the model's GGUF metadata, and how it was computed.

    llama.cpp keeps a key and a value vector per layer and KV head: layers x KV heads x (key length +
    value length) x 2 bytes (f16). benchmarks/memory.py confirms it for Gemma 3 270M (18 KiB per
    token). None when the metadata does not describe an attention cache.
    """
    try:
        metadata = read_metadata(path)
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
    """One server per node: the GGUF weights and the server's buffers once + per parallel slot: its KV cache at n_ctx."""
    path, n_ctx = local.model_path(config.model), local.parse_options(config).n_ctx
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
            f"{size(LOCAL_SERVER_BYTES)} of buffers once (measured, benchmarks/local_engines.py); each parallel slot adds {cache}"
        ),
        instance_bytes=cache_bytes,
        shared_bytes=weights + LOCAL_SERVER_BYTES,
        slots_per_core=LOCAL_SLOTS_PER_CORE,
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
    shared = f" - {size(footprint.shared_bytes)} shared by all slots" if footprint.shared_bytes else ""
    reasons.append(
        f"RAM: {size(capacity.free_ram_bytes)} free - {size(headroom)} headroom{shared} = {size(usable)} / "
        f"{size(per_slot)} per slot (Ray worker {size(WORKER_BYTES)} + model {size(footprint.instance_bytes)}) = {bounds['RAM']}"
    )
    if footprint.slots_per_core:
        bounds["CPU"] = capacity.cpu_count * footprint.slots_per_core
        per_core = footprint.slots_per_core
        reasons.append(f"CPU: {capacity.cpu_count} cores x {per_core} slot{'s' if per_core != 1 else ''} per core = {bounds['CPU']}")
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
