"""LLM slots per node: the formula on made-up nodes, nvidia-smi, the footprints backends state (GGUF
metadata for the local one), and the two commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from metaagent_ray import resources
from metaagent_ray.cli import app
from metaagent_ray.errors import ConfigError
from metaagent_ray.llm import LLMConfig, ModelFootprint, create_llm
from metaagent_ray.llm.base import GiB, MiB
from metaagent_ray.llm.local import gguf_metadata
from metaagent_ray.llm.local import model as local
from metaagent_ray.llm.local.model import kv_bytes_per_token
from metaagent_ray.resources import (
    AGENT_BYTES,
    EXECUTOR_BYTES,
    GPU,
    MAX_SLOTS,
    NodeCapacity,
    default_slots,
    node_capacity,
    node_resources_json,
    parse_nvidia_smi,
    plan_slots,
)
from tests.ollama_server import DEFAULT_MODELS, OllamaServer, allow_model_requests_to

H200 = GPU(index=0, name="NVIDIA H200", total_bytes=140 * GiB, free_bytes=139 * GiB)
SMALL_GPU = GPU(index=1, name="NVIDIA T400", total_bytes=2 * GiB, free_bytes=1 * GiB)


def node(free_gib: float, *, total_gib: float = 32, cpus: int = 8, gpus: list[GPU] | None = None) -> NodeCapacity:
    return NodeCapacity(total_ram_bytes=int(total_gib * GiB), free_ram_bytes=int(free_gib * GiB), cpu_count=cpus, gpus=gpus or [], gpu_note="test")


def local_model(instance_mib: int = 400, weights_mib: int = 250, slots_per_core: int = 1) -> ModelFootprint:
    return ModelFootprint(
        source="test model",
        instance_bytes=instance_mib * MiB,
        shared_bytes=weights_mib * MiB,
        slots_per_core=slots_per_core,
        gpu_unused_reason="runs on the CPU",
    )


# --- the formula ---------------------------------------------------------------------------------


def test_local_slots_are_bounded_by_cores_when_ram_is_plenty() -> None:
    plan = plan_slots(node(free_gib=20, cpus=4), local_model())
    assert plan.slots == 4
    assert plan.reasons[-1].startswith("Slots: min(RAM ") and plan.reasons[-1].endswith(f"CPU 4, cap {MAX_SLOTS}) = 4")
    assert "CPU: 4 cores x 1 slot per core = 4" in plan.reasons


def test_local_slots_are_bounded_by_ram_after_headroom_and_shared_weights() -> None:
    # 8 GiB free - 3.2 GiB headroom (10% of 32) - 1 GiB weights - the executor = 3.7 GiB; / (1 GiB + an agent) -> 3
    model = local_model(instance_mib=1024, weights_mib=1024)
    plan = plan_slots(node(free_gib=8, total_gib=32, cpus=16), model)
    expected = int((8 * GiB - int(32 * GiB * 0.1) - 1024 * MiB - EXECUTOR_BYTES) // (AGENT_BYTES + 1024 * MiB))
    assert plan.slots == expected == 3
    ram_line = next(line for line in plan.reasons if line.startswith("RAM:"))
    assert "- 3.2 GiB headroom - 1.0 GiB shared by all slots - 74 MiB executor = 3.7 GiB" in ram_line and ram_line.endswith("= 3")


def test_headroom_is_at_least_two_gib_on_a_small_node() -> None:
    plan = plan_slots(node(free_gib=3, total_gib=8, cpus=8), local_model(instance_mib=200, weights_mib=0))
    assert plan.slots == int((1 * GiB - EXECUTOR_BYTES) // (AGENT_BYTES + 200 * MiB))
    assert any("3.0 GiB free - 2.0 GiB headroom" in line for line in plan.reasons)


def test_slots_per_core_multiply_the_cores() -> None:
    plan = plan_slots(node(free_gib=20, cpus=2), local_model(slots_per_core=4))
    assert plan.slots == 8 and "CPU: 2 cores x 4 slots per core = 8" in plan.reasons


def test_a_node_short_of_ram_still_gets_one_slot_and_says_so() -> None:
    plan = plan_slots(node(free_gib=1, total_gib=8), local_model())
    assert plan.slots == 1
    assert "RAM 0" in plan.reasons[-1] and "1 anyway" in plan.reasons[-1]


def test_the_cap_bounds_a_model_that_costs_nothing() -> None:
    fake = ModelFootprint(source="fake", instance_bytes=0, gpu_unused_reason="no model")
    assert plan_slots(node(free_gib=500, total_gib=512), fake).slots == MAX_SLOTS
    assert plan_slots(node(free_gib=500, total_gib=512), fake, cap=5).slots == 5


def test_a_server_bounds_slots_by_its_parallelism_and_gpus_are_reported() -> None:
    server = ModelFootprint(
        source="ollama", instance_bytes=0, server_parallel=4, server_parallel_reason="OLLAMA_NUM_PARALLEL=4", gpu_model_bytes=int(1.5 * GiB)
    )
    plan = plan_slots(node(free_gib=100, total_gib=128, cpus=16, gpus=[H200, SMALL_GPU]), server)
    assert plan.slots == 4
    assert "Server: OLLAMA_NUM_PARALLEL=4 = 4" in plan.reasons
    assert "GPU 0 (NVIDIA H200, 139.0 GiB free of 140.0 GiB): can hold the 1.5 GiB model" in plan.reasons
    assert any(line.startswith("GPU 1 (NVIDIA T400, 1.0 GiB free of 2.0 GiB): too small") for line in plan.reasons)
    assert plan.reasons[0] == "Node: 100.0 GiB of 128.0 GiB RAM free, 16 CPU cores, NVIDIA H200, NVIDIA T400"


def test_gpus_a_backend_does_not_use_are_named_as_unused() -> None:
    plan = plan_slots(node(free_gib=20, gpus=[H200]), local_model())
    assert "GPU 0 (NVIDIA H200, 139.0 GiB free of 140.0 GiB): not used: runs on the CPU" in plan.reasons
    assert "GPU: none (test)" in plan_slots(node(free_gib=20), local_model()).reasons


def test_node_resources_json_is_what_ray_start_takes() -> None:
    plan = plan_slots(node(free_gib=20, cpus=3), local_model())
    assert json.loads(node_resources_json(plan)) == {"llm_slot": 3}


# --- what the node has ---------------------------------------------------------------------------


def test_nvidia_smi_csv_is_parsed_in_mib() -> None:
    text = "0, NVIDIA H200, 143771, 143150\n1, NVIDIA GeForce RTX 4090, 24564, 1024\n\n2, NVIDIA A100-SXM4-40GB MIG 1g.5gb, [N/A], [N/A]\n"
    gpus = parse_nvidia_smi(text)
    assert gpus == [
        GPU(index=0, name="NVIDIA H200", total_bytes=143771 * MiB, free_bytes=143150 * MiB),
        GPU(index=1, name="NVIDIA GeForce RTX 4090", total_bytes=24564 * MiB, free_bytes=1024 * MiB),
    ]
    assert parse_nvidia_smi("") == []


def test_a_container_memory_and_cpu_limit_bound_the_capacity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "find_gpus", lambda: ([], "test"))
    (tmp_path / "memory.max").write_text(f"{4 * GiB}\n")
    (tmp_path / "memory.current").write_text(f"{3 * GiB}\n")  # 1 GiB of it is file cache, which can be reclaimed
    (tmp_path / "memory.stat").write_text(f"anon {2 * GiB}\nactive_file {512 * MiB}\ninactive_file {512 * MiB}\n")
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    capacity = node_capacity(tmp_path)
    assert capacity.total_ram_bytes == 4 * GiB
    assert capacity.free_ram_bytes <= 2 * GiB
    assert capacity.cpu_count == 1


def test_without_cgroup_limits_the_whole_machine_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "find_gpus", lambda: ([], "test"))
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "cpu.max").write_text("max 100000\n")
    capacity = node_capacity(tmp_path)
    assert capacity.total_ram_bytes > capacity.free_ram_bytes > 0
    assert capacity.cpu_count >= 1


# --- what one instance costs ---------------------------------------------------------------------


@pytest.fixture(autouse=True)
def metadata_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """GGUF metadata read here is cached under the test's own directory, not the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_gguf(path: Path, arch: str, items: dict[str, Any]) -> Path:
    """A GGUF file with this metadata and no tensors, written by ggml's own writer (the gguf package)."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(path, arch)
    for key, value in items.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_uint32(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GEMMA_LIKE = {
    "general.tags": ["text-generation", "gemma"],
    "gemma3.block_count": 18,
    "gemma3.embedding_length": 640,
    "gemma3.attention.head_count": 4,
    "gemma3.attention.key_length": 256,
    "gemma3.attention.value_length": 256,
    "gemma3.rope.freq_base": 1e6,
    "gemma3.attention.head_count_kv": 1,
    "tokenizer.ggml.tokens": ["<pad>", "<eos>", "hello"] * 1000,
    "tokenizer.ggml.scores": [0.5] * 3000,
}


def test_kv_cache_per_token_comes_from_the_gguf_metadata(tmp_path: Path) -> None:
    # Gemma 3 270M: 18 layers x 1 KV head x (256 + 256) x 2 bytes
    per_token, how = kv_bytes_per_token(write_gguf(tmp_path / "gemma.gguf", "gemma3", GEMMA_LIKE))
    assert per_token == 18 * 1024
    assert how == "18 layers, KV heads 1, key+value 512, f16"


def test_a_files_metadata_is_read_once_then_from_the_cache(tmp_path: Path, metadata_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = write_gguf(tmp_path / "gemma.gguf", "gemma3", GEMMA_LIKE)
    first = gguf_metadata.read_metadata(model)
    assert first["gemma3.block_count"] == 18 and "tokenizer.ggml.tokens" not in first  # long arrays are left out
    assert len(list(metadata_cache.rglob("*.json"))) == 1
    monkeypatch.setattr(gguf_metadata, "_read", lambda path: pytest.fail("read again"))
    assert gguf_metadata.read_metadata(model) == first


def test_kv_heads_per_layer_and_default_head_lengths(tmp_path: Path) -> None:
    items = {
        "llama.block_count": 2,
        "llama.embedding_length": 1024,
        "llama.attention.head_count": 8,
        "llama.attention.head_count_kv": [2, 4],
    }
    per_token, _ = kv_bytes_per_token(write_gguf(tmp_path / "m.gguf", "llama", items))
    assert per_token == (2 + 4) * (128 + 128) * 2


def test_metadata_without_attention_is_not_guessed(tmp_path: Path) -> None:
    assert kv_bytes_per_token(write_gguf(tmp_path / "rnn.gguf", "rwkv", {})) is None
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x01")
    assert kv_bytes_per_token(tmp_path / "junk.gguf") is None


def test_local_footprint_shares_the_weights_and_the_server_and_adds_the_context_per_slot(tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "gemma.gguf", "gemma3", GEMMA_LIKE)
    footprint = create_llm(LLMConfig(backend="local", model=str(model), options={"n_ctx": 2048})).footprint()
    assert footprint.shared_bytes == model.stat().st_size + local.SERVER_BYTES
    assert footprint.instance_bytes == 2048 * 18 * 1024
    assert footprint.slots_per_core == local.SLOTS_PER_CORE
    assert "36 MiB context cache (n_ctx 2048 x 18.0 KiB per token" in footprint.source


def test_ollama_footprint_asks_the_server_and_reads_its_parallelism(monkeypatch: pytest.MonkeyPatch) -> None:
    with OllamaServer() as server:
        monkeypatch.delenv("OLLAMA_NUM_PARALLEL", raising=False)
        footprint = create_llm(LLMConfig(backend="ollama", options={"host": server.url})).footprint()
        assert footprint.gpu_model_bytes == DEFAULT_MODELS["llama3.2:1b"]
        assert footprint.instance_bytes == 0 and footprint.server_parallel == 1
        assert f"ollama llama3.2:1b at {server.url}: 1.2 GiB as the server reports it" in footprint.source
        monkeypatch.setenv("OLLAMA_NUM_PARALLEL", "6")
        assert create_llm(LLMConfig(backend="ollama", options={"host": server.url})).footprint().server_parallel == 6


def test_fake_footprint_takes_a_size_and_refuses_a_bad_one() -> None:
    assert create_llm(LLMConfig(backend="fake", options={"model_mb": 500})).footprint().instance_bytes == 500_000_000
    assert create_llm(LLMConfig(backend="fake")).footprint().instance_bytes == 0
    with pytest.raises(ConfigError, match="model_mb: Input should be greater than or equal to 0"):
        create_llm(LLMConfig(backend="fake", options={"model_mb": -1}))


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown LLM backend 'nosuch'"):
        default_slots(LLMConfig(backend="nosuch"))


def test_default_slots_for_the_fake_backend() -> None:
    plan = default_slots(LLMConfig(backend="fake", options={"model_mb": 1000}), node(free_gib=12, total_gib=16))
    assert plan.slots == int((12 * GiB - 2 * GiB - EXECUTOR_BYTES) // (AGENT_BYTES + 1000 * 1000**2)) == 10


# --- the commands --------------------------------------------------------------------------------

runner = CliRunner()


def test_resources_command_prints_figures_reasoning_and_count() -> None:
    result = runner.invoke(app, ["resources", "--llm", "fake", "--fake-model-mb", "1000"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("Node: ") and lines[1] == "Model: fake: 1000 MB per instance (option model_mb)"
    assert any(line.startswith("RAM: ") for line in lines)
    slots = json.loads(lines[-1].split("--resources ", 1)[1].strip("'"))["llm_slot"]
    assert f"llm_slot = {slots}: " in result.output


def test_node_resources_command_prints_only_the_json(monkeypatch: pytest.MonkeyPatch) -> None:
    # 10 GiB free of 16: - 2 GiB headroom - 74 MiB executor = 7.9 GiB; / (2000 MB model + 160 KiB agent) per slot -> 4
    monkeypatch.setattr(resources, "node_capacity", lambda: node(free_gib=10, total_gib=16, cpus=8))
    result = runner.invoke(app, ["node-resources", "--llm", "fake", "--fake-model-mb", "2000"])
    assert result.exit_code == 0, result.output
    assert result.output == '{"llm_slot": 4}\n'


def test_resources_command_with_ollama_names_the_server_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_NUM_PARALLEL", "3")
    with OllamaServer() as server:
        result = runner.invoke(app, ["resources", "--llm", "ollama", "--ollama-host", server.url])
    assert result.exit_code == 0, result.output
    assert "Server: OLLAMA_NUM_PARALLEL=3 here" in result.output
    assert "llm_slot = 3: " in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--llm", "local", "--fake-model-mb", "5"], "error: --fake-model-mb applies to --llm fake only"),
        (["--llm", "fake", "--ollama-host", "http://x"], "error: --ollama-host applies to --llm ollama or auto only"),
        (["--llm", "nosuch"], "error: unknown LLM backend 'nosuch'"),
    ],
)
def test_resources_errors_are_one_line(args: list[str], message: str) -> None:
    for command in ("resources", "node-resources"):
        result = runner.invoke(app, [command, *args])
        assert result.exit_code == 2
        assert result.output.strip().splitlines()[0].startswith(message)


def test_an_unreachable_ollama_server_is_one_line() -> None:
    with OllamaServer() as server:
        url = server.url
    allow_model_requests_to(url)  # nothing answers there now
    result = runner.invoke(app, ["resources", "--llm", "ollama", "--ollama-host", url])
    assert result.exit_code == 2
    assert result.output.strip().startswith(f"error: cannot reach Ollama at {url}")
