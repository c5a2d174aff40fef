"""One Ray instance for the whole test session: starting Ray costs about 10 s here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metaagent_ray.runtime import RayOptions, ensure_ray

SESSION_SLOTS = 8  # the node's llm_slot capacity; runs with --slots N <= 8 reserve N of them

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ensure_ray(RayOptions(slots=SESSION_SLOTS))
    yield
    ray.shutdown()


@pytest.fixture
def latency_file(tmp_path: Path):
    """Write a --fake-latency JSON file such as {"default": 0.1, "1": 2.0} and return its path."""

    def write(seconds: dict[str, float]) -> str:
        path = tmp_path / "latency.json"
        path.write_text(json.dumps(seconds))
        return str(path)

    return write


@pytest.fixture
def ollama_server():
    """An Ollama-compatible server on 127.0.0.1 (see tests/ollama_server.py)."""
    from tests.ollama_server import OllamaServer

    with OllamaServer() as server:
        yield server
