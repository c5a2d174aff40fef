"""One Ray instance for the whole test session: starting Ray costs about 10 s here.

The session's Ray is a simulated two-node cluster (two raylets on this machine) with different
`llm_slot` counts and two logical GPUs on the head, so placement across nodes and GPU pinning are
tested without a real cluster or GPU. Before it starts, a third-party backend (`echo`,
tests/plugin/) is installed into a directory on PYTHONPATH, so its processes find it.

Real models are off in every test not marked `model` ($METAAGENT_ALLOW_MODEL_REQUESTS=0, read by
`llm.base.check_model_request`): the local backend refuses to load or call its model, and the
ollama and openai backends call only the tests' stand-in servers, which allow their own URL while
they run (tests/ollama_server.py), and the closed ports of `closed_port_url`. The switch is set in
this process and every process a test starts (CLI runs, `ray start` clusters); the session's Ray
workers started before it, and run agents only of runs whose backend this process checked first.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

from metaagent_ray.llm import LLMRequest, Message
from metaagent_ray.llm.base import MODEL_REQUESTS_ENV
from metaagent_ray.resources import SLOT_RESOURCE
from tests.ollama_server import allow_model_requests_to

HEAD_SLOTS, WORKER_SLOTS = 8, 4  # llm_slot per node; runs with --slots N <= 12 reserve N of them
LOGICAL_GPUS = 2

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Agent 0 delegates (the fake LLM answers DELEGATE to a task marked [delegate]); 2 needs 0 and 1.
DELEGATING_PLAN = {
    "description": "one agent delegates",
    "agents": [
        {"role": "RESEARCHER", "task": "Survey the field [delegate]", "depends_on": []},
        {"role": "RESEARCHER", "task": "Check the facts", "depends_on": []},
        {"role": "SYNTHESIZER", "task": "Write it up", "depends_on": [0, 1]},
    ],
}
PLUGIN = Path(__file__).resolve().parent / "plugin" / "metaagent_echo_backend.py"


@pytest.fixture(autouse=True)
def no_model_requests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real models only in tests marked `model`: elsewhere a call to one fails loudly (ModelRequestsForbidden)."""
    if request.node.get_closest_marker("model") is None:
        monkeypatch.setenv(MODEL_REQUESTS_ENV, "0")


def install_echo_backend(site: Path) -> None:
    """Install the third-party `echo` backend into `site` as pip would: its module, and a dist-info whose
    entry point registers it in the `metaagent_ray.backends` group. `site` goes on PYTHONPATH."""
    shutil.copy(PLUGIN, site / PLUGIN.name)
    info = site / "metaagent_echo_backend-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: metaagent-echo-backend\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[metaagent_ray.backends]\necho = metaagent_echo_backend:create\n")
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def echo_backend(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The third-party `echo` backend is installed for the rest of the session (processes started from now on find it)."""
    install_echo_backend(tmp_path_factory.mktemp("site-packages"))


@pytest.fixture(scope="session")
def ray_cluster(echo_backend: None):
    import logging

    import ray
    from ray.cluster_utils import Cluster

    # `echo_backend` comes first: Ray's workers inherit the PYTHONPATH that finds it
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
    """A local address where nothing listens: connecting is refused. Backends may call it although
    real models are off: nothing answers there."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    allow_model_requests_to(f"http://127.0.0.1:{port}")
    return f"http://127.0.0.1:{port}{path}"
