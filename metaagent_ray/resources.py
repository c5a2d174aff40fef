"""How many LLM calls one node can serve at once: its `llm_slot` Ray resource.

The count comes from what the node has (free RAM, CPU cores, GPUs) and what one LLM instance costs
there, which each backend states itself (`LLM.footprint()`: llm/local/model.py, llm/ollama.py, ...), and
every step of the reasoning is kept as a line a person can check:

- a run's agents on a node are threads of one executor actor (executors.py): the executor's process
  (EXECUTOR_BYTES) is needed once, and each slot adds one agent in flight (AGENT_BYTES) plus what the
  model needs per slot; RAM bound = (free RAM - headroom - memory shared by all slots - executor) /
  (agent + model per slot);
- a CPU-bound backend (`local`) serves a number of slots per core: cores x that bound the slots;
- a server that answers at most N requests at once (`ollama`) bounds the slots at N: further
  requests only queue there. The model's size and the GPUs are reported, since they decide where
  the server can put the model, not how many agents wait.

The result is min(bounds, the run's default agent limit), and at least 1: a run needs one slot to
make progress.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import psutil
from pydantic import BaseModel

from .llm import LLMConfig, ModelFootprint, create_llm
from .llm.auto import resolve_auto
from .llm.base import GiB, KiB, MiB, size
from .settings import RunSettings

SLOT_RESOURCE = "llm_slot"
MAX_SLOTS = RunSettings.default("max_agents")  # more slots than one plan has agents by default never help
HEADROOM_MIN_BYTES = 2 * GiB  # RAM left to the OS, Ray's own processes and the driver ...
HEADROOM_FRACTION = 0.10  # ... or this share of all RAM, whichever is larger

# Measured on 2026-12-06 with `python benchmarks/agent_cost.py` (Ray 2.60, 64 agents in flight through
# the openai backend, 2-core x86 machine); benchmarks/README.md holds the table.
EXECUTOR_BYTES = 74 * MiB  # anonymous memory (RssAnon) of a node's executor actor process, once per run
AGENT_BYTES = 160 * KiB  # what one more agent waiting on its LLM call adds to it: a thread, an HTTP client, buffers

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


class SlotPlan(BaseModel):
    """The slot count for a node and the reasoning behind it, one human line per step."""

    slots: int
    reasons: list[str]


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
    usable = capacity.free_ram_bytes - headroom - footprint.shared_bytes - EXECUTOR_BYTES
    per_slot = AGENT_BYTES + footprint.instance_bytes
    bounds = {"RAM": max(0, usable // per_slot)}
    shared = f" - {size(footprint.shared_bytes)} shared by all slots" if footprint.shared_bytes else ""
    reasons.append(
        f"RAM: {size(capacity.free_ram_bytes)} free - {size(headroom)} headroom{shared} - {size(EXECUTOR_BYTES)} executor "
        f"= {size(usable)} / {size(per_slot)} per slot (agent thread {size(AGENT_BYTES)} + model {size(footprint.instance_bytes)}) "
        f"= {bounds['RAM']}"
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
    plan = plan_slots(capacity or node_capacity(), create_llm(config).footprint())
    return SlotPlan(slots=plan.slots, reasons=[*choice, *plan.reasons])


def node_resources_json(plan: SlotPlan) -> str:
    """The custom resources for `ray start --resources '<json>'` on a cluster node."""
    return json.dumps({SLOT_RESOURCE: plan.slots})
