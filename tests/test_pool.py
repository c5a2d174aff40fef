"""The LLM instance pool on logical GPUs: stand-in servers as Ray actors, pinned to their GPU share, one call each.

No test here needs a GPU: the session's Ray has two logical GPUs (tests/conftest.py) and every
instance runs tests/stand_in_server.py, which reports the CUDA_VISIBLE_DEVICES it was started with.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
import ray

from metaagent_ray import MetaAgent
from metaagent_ray.errors import ConfigError
from metaagent_ray.llm import LLMConfig, LLMError, LLMRequest, Message, create_llm, get_llm
from metaagent_ray.pool import PoolError, PoolHandle, PoolSpec, start_pool
from tests.ollama_server import allow_model_requests_to

ROOT = Path(__file__).resolve().parent.parent
PLAN_SCHEMA = {"type": "object", "properties": {"agents": {"type": "array"}}, "required": ["agents"]}


def stand_in(api: str = "ollama", delay: float = 0.0) -> str:
    return f"{sys.executable} -m tests.stand_in_server --host {{host}} --port {{port}} --api {api} --delay {delay} --model {{model}}"


pytestmark = pytest.mark.usefixtures("ray_session")  # two logical GPUs on the head node


@pytest.fixture(autouse=True)
def stand_ins_may_be_called() -> None:
    """The pools' stand-in servers listen on free loopback ports, known only once they run: backends may call any."""
    allow_model_requests_to("http://127.0.0.1:")


@pytest.fixture
def pool() -> Iterator[Callable[..., PoolHandle]]:
    """Start pools of stand-in servers; each is stopped when the test ends."""
    started: list[PoolHandle] = []

    def start(**fields: object) -> PoolHandle:
        values: dict[str, object] = {"instances": 2, "gpus_per_instance": 1, "model": "llama3.2:1b", "ready_timeout": 20, "cwd": str(ROOT)}
        values["command"] = stand_in(str(fields.get("api", "ollama")), float(fields.pop("delay", 0.0)))  # type: ignore[arg-type]
        handle = start_pool(PoolSpec(**{**values, **fields}))
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


def server_state(url: str, what: str) -> dict:
    return httpx.get(f"{url.removesuffix('/v1')}/{what}").json()


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def ask(text: str, **fields: object) -> LLMRequest:
    return LLMRequest(messages=[Message("user", text)], caller="agent", **fields)  # type: ignore[arg-type]


@ray.remote(num_cpus=0)
def call_through_pool(config: LLMConfig, text: str) -> str:
    return get_llm(config).complete(ask(text)).text


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_each_instance_runs_pinned_to_its_own_gpu(pool) -> None:
    handle = pool()

    seen = [server_state(info.url, "gpu")["cuda_visible_devices"] for info in handle.instances]
    assert sorted(seen) == ["0", "1"]
    assert [info.gpu_ids for info in handle.instances] == [[gpu] for gpu in seen]
    assert "GPU 0" in handle.describe() and "GPU 1" in handle.describe()


def test_half_a_gpu_each_packs_two_instances_on_one_gpu(pool) -> None:
    handle = pool(gpus_per_instance=0.5)

    seen = {server_state(info.url, "gpu")["cuda_visible_devices"] for info in handle.instances}
    assert len(seen) == 1 and seen <= {"0", "1"}


def test_concurrent_agents_take_one_free_instance_each_and_use_both(pool) -> None:
    handle = pool(delay=0.2)
    config = handle.llm_config()
    create_llm(config).check()
    actor = ray.get_actor(handle.name, namespace=handle.namespace)
    held = ray.get([actor.acquire.remote(None, 60), actor.acquire.remote(None, 60)])  # both instances busy

    calls = [call_through_pool.remote(config, f"topic {index}") for index in range(4)]
    assert wait_until(lambda: handle.stats()["waiting"] == 4), "the four calls should all wait for an instance"
    for lease in held:
        actor.release.remote(lease.id)

    assert sorted(ray.get(calls, timeout=30)) == [f"Answer to: topic {index}" for index in range(4)]
    per_server = [server_state(info.url, "stats") for info in handle.instances]
    assert [stats["max_in_flight"] for stats in per_server] == [1, 1]
    assert all(stats["chats"] >= 1 for stats in per_server) and sum(stats["chats"] for stats in per_server) == 4
    assert handle.stats()["waiting"] == 0 and all(entry["busy"] == 0 for entry in handle.stats()["instances"])


def test_an_openai_compatible_pool_serves_structured_output(pool) -> None:
    handle = pool(api="openai", instances=1, model="test-model")
    llm = create_llm(handle.llm_config())
    llm.check()

    assert '"agents"' in llm.complete(ask("plan it", json_schema=PLAN_SCHEMA)).text
    assert handle.instances[0].url.endswith("/v1")


def test_a_lease_never_given_back_expires(pool) -> None:
    handle = pool(instances=1, gpus_per_instance=0)
    actor = ray.get_actor(handle.name, namespace=handle.namespace)
    ray.get(actor.acquire.remote(None, 0.3))  # its caller "dies" and never releases

    assert ray.get(actor.acquire.remote(5, 60)) is not None


def test_stopping_the_pool_ends_the_servers_and_the_backend_says_so(pool) -> None:
    handle = pool(instances=1, gpus_per_instance=0)
    pids = [server_state(info.url, "gpu")["pid"] for info in handle.instances]
    assert all(alive(pid) for pid in pids)

    handle.stop()

    assert wait_until(lambda: not any(alive(pid) for pid in pids))
    with pytest.raises(LLMError, match="no LLM pool named"):
        create_llm(handle.llm_config()).complete(ask("anyone?"))


def test_a_server_that_exits_at_once_fails_with_its_last_words(pool) -> None:
    command = f"{sys.executable} -c \"import sys; print('no CUDA-capable device is detected', file=sys.stderr); sys.exit(3)\""
    with pytest.raises(PoolError) as caught:
        pool(instances=1, command=command)

    message = str(caught.value)
    assert "exited with code 3 before it answered" in message and "no CUDA-capable device is detected" in message
    assert "\n" not in message
    assert wait_until(lambda: ray.available_resources().get("GPU", 0) == 2), "the failed pool must free its GPUs"


def test_a_server_that_never_answers_times_out(pool) -> None:
    with pytest.raises(PoolError, match=r"did not answer http://127\.0\.0\.1:\d+/ within 1 s"):
        pool(instances=1, command=f"{sys.executable} -c \"import time; time.sleep(60)\"", ready_timeout=1)


def test_a_missing_server_program_is_named() -> None:
    with pytest.raises(PoolError, match="cannot run `no-such-llm-server`: No such file or directory"):
        start_pool(PoolSpec(instances=1, gpus_per_instance=0, command="no-such-llm-server --port {port}"))


def test_more_gpus_than_the_cluster_has_fail_at_once() -> None:
    with pytest.raises(PoolError, match="3 LLM servers with 1 GPU each need 3 GPUs; the Ray cluster has 2"):
        start_pool(PoolSpec(instances=3))


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"api": "openai"}, "needs a model"),
        ({"command": "serve --port {prot}"}, "'prot'"),
        ({"gpus_per_instance": 1.5}, "whole number"),
        ({"instances": 0}, "instances: Input should be greater than or equal to 1"),
    ],
)
def test_bad_specs_are_one_line(fields: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        MetaAgent(llm="ollama", pool=fields)


def test_the_default_commands_are_ollama_and_vllm() -> None:
    ollama = PoolSpec()
    vllm = PoolSpec(api="openai", model="Qwen/Qwen2.5-0.5B-Instruct")

    assert ollama.command_line(11500) == ["ollama", "serve"]
    assert ollama.server_env(11500) == {"OLLAMA_HOST": "127.0.0.1:11500"}
    assert vllm.command_line(8001) == ["vllm", "serve", "Qwen/Qwen2.5-0.5B-Instruct", "--host", "127.0.0.1", "--port", "8001"]


def test_the_cli_serves_a_run_from_a_gpu_pool(tmp_path: Path) -> None:
    """--gpu-instances: the servers start as Ray actors, every agent goes to one of them, the pool stops."""
    from typer.testing import CliRunner

    from metaagent_ray.cli import app
    from metaagent_ray.record import RunRecord

    command = f"{sys.executable} -m tests.stand_in_server --host {{host}} --port {{port}} --api ollama --model {{model}}"
    result = CliRunner().invoke(
        app,
        ["exec", str(ROOT / "examples" / "business_plan.json"), "--gpu-instances", "2", "--server-command", command, "--model", "llama3.2:1b",
         "--run-dir", str(tmp_path / "run")],
    )
    assert result.exit_code == 0, result.output
    assert "🖥️ LLM pool: " in result.output
    record = RunRecord.model_validate_json((tmp_path / "run" / "record.json").read_text())
    assert record.llm.backend == "pooled" and record.slots == 2
    assert all(agent.status == "ok" and agent.output.startswith("Answer to:") for agent in record.agents)
