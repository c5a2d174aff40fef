"""One Ray instance for the whole test session: starting Ray costs about 10 s here.

The session's Ray is a simulated two-node cluster (two raylets on this machine) with different
`llm_slot` counts and two logical GPUs on the head, so placement across nodes and GPU pinning are
tested without a real cluster or GPU.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from metaagent_ray.llm import LLMRequest, Message
from metaagent_ray.resources import SLOT_RESOURCE

HEAD_SLOTS, WORKER_SLOTS = 8, 4  # llm_slot per node; runs with --slots N <= 12 reserve N of them
LOGICAL_GPUS = 2

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="session")
def ray_cluster():
    import logging

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "resources": {SLOT_RESOURCE: HEAD_SLOTS},
            "num_gpus": LOGICAL_GPUS,
        },
    )
    cluster.add_node(resources={SLOT_RESOURCE: WORKER_SLOTS}, num_gpus=0)
    ray.init(address=cluster.address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """Ray is up: the runtime finds it initialized and uses it."""
    yield


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


def agent_request(text: str = "Compare A and B", **fields: object) -> LLMRequest:
    """An agent's LLM request, for testing a backend directly."""
    messages = [Message("system", "You are a RESEARCHER."), Message("user", text)]
    return LLMRequest(messages=messages, caller="agent", **fields)  # type: ignore[arg-type]


def closed_port_url(path: str = "") -> str:
    """A local address where nothing listens: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
