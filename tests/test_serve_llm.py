"""--serve-llm: a Ray Serve application of llama.cpp replicas that a run's agents call through `openai`.

The spec's checks need no model; the run (marked `model`) deploys two replicas of the real Gemma
model on the session's Ray, with a small context each, and deletes the application at the end.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from metaagent_ray.api import MetaAgent, ServeLLMSpec
from metaagent_ray.errors import ConfigError

PLAN = {  # four agents at once, more than one replica's two slots: both replicas must serve
    "description": "four notes, then one summary",
    "agents": [
        *({"role": "RESEARCHER", "task": f"Research {subject}", "depends_on": []} for subject in ("Python", "Rust", "Go", "Java")),
        {"role": "SYNTHESIZER", "task": "Summarize the four notes", "depends_on": [0, 1, 2, 3]},
    ],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_spec_file_is_read_and_its_errors_are_one_line(tmp_path: Path) -> None:
    good = tmp_path / "serve.yaml"
    good.write_text("replicas: 3\nparallel: 2\nlocal:\n  n_ctx: 1024\n")
    spec = ServeLLMSpec.from_yaml(good)
    assert (spec.replicas, spec.parallel, spec.local.n_ctx, spec.capacity, spec.router) == (3, 2, 1024, 6, "prefix")
    bad = tmp_path / "bad.yaml"
    bad.write_text("replicas: 0\n")
    with pytest.raises(ConfigError, match=r"--serve-llm .*bad.yaml: replicas: Input should be greater than or equal to 1"):
        ServeLLMSpec.from_yaml(bad)
    bad.write_text("replica: 2\n")
    with pytest.raises(ConfigError, match="replica: Extra inputs are not permitted"):
        ServeLLMSpec.from_yaml(bad)
    with pytest.raises(ConfigError, match="missing.yaml"):
        ServeLLMSpec.from_yaml(tmp_path / "missing.yaml")


def test_the_router_is_ray_serves_prefix_router_until_a_replica_is_full() -> None:
    from metaagent_ray.serve_llm import request_router

    prefix = request_router(ServeLLMSpec(parallel=4))
    assert prefix.request_router_class.endswith(":PrefixCacheAffinityRouter")
    assert prefix.request_router_kwargs == {"imbalanced_threshold": 3}
    assert request_router(ServeLLMSpec(router="power_of_two")).is_default_request_router()


def test_another_backend_with_serve_llm_is_one_line() -> None:
    with pytest.raises(ConfigError, match="--serve-llm runs agents through the openai backend; leave out --llm fake"):
        MetaAgent(llm="fake", serve_llm={}).execute(PLAN, "q", save=False)


@pytest.fixture
def serve_cleanup() -> Iterator[None]:
    """Serve's controller and proxy end with the test, so the session's Ray is as it was."""
    yield
    from ray import serve

    serve.shutdown()


@pytest.mark.model
@pytest.mark.usefixtures("ray_session", "serve_cleanup")
def test_a_run_through_two_llama_cpp_replicas_uses_both_and_their_capacity(tmp_path: Path) -> None:
    pytest.importorskip("xllamacpp")
    spec = ServeLLMSpec(
        name="metaagent-llm-test",
        http_port=free_port(),
        replicas=2,
        parallel=2,
        cpus_per_replica=0,  # the session's simulated nodes share two cores with everything else
        local={"n_ctx": 1024, "n_threads": 1},
    )
    from ray import serve

    with MetaAgent(serve_llm=spec, max_tokens=48) as meta:
        record = meta.execute(PLAN, "Compare programming languages", run_dir=tmp_path / "run")
        replicas = httpx.get(f"http://127.0.0.1:{spec.http_port}{spec.route_prefix}/replicas", timeout=30).json()
        with MetaAgent(serve_llm=spec, max_tokens=16) as attached:  # finds the application running: uses it, leaves it
            again = attached.execute({"agents": [{"role": "RESEARCHER", "task": "Research Go"}]}, "Go", save=False)
        assert again.agents[0].status == "ok" and again.slots == 4
        assert serve.status().applications[spec.name].status == "RUNNING"
    assert record.llm.backend == "openai"
    assert all(agent.status == "ok" and agent.output.strip() for agent in record.agents), [(a.status, a.error, a.output) for a in record.agents]
    assert record.slots == spec.replicas * spec.parallel == 4  # the replicas' capacity, not the machine's
    assert len(replicas) == 2 and all(served["requests"] >= 1 for served in replicas.values()), replicas
    assert sum(served["requests"] for served in replicas.values()) >= len(record.agents)
    assert spec.name not in serve.status().applications  # the run deployed it, so closing deleted it
