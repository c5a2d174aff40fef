"""Submitting to an existing Ray cluster: a separate driver process connects with --address."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metaagent_ray.resources import MAX_SLOTS
from tests.conftest import EXAMPLES

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


def test_a_separate_driver_runs_a_plan_on_the_cluster(ray_cluster, tmp_path: Path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "metaagent_ray", "exec", str(EXAMPLES / "software_architecture.json"),
         "--llm", "fake", "--address", ray_cluster.address, "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "🔀 Execution layers (parallel groups): 5" in result.stdout
    record = json.loads((run_dir / "record.json").read_text())
    assert all(agent["status"] == "ok" for agent in record["agents"])
    assert record["slots"] == 12  # the cluster's llm_slot resources: 8 + 4
    nodes = {node.node_id for node in ray_cluster.list_all_nodes()}
    assert {agent["node"] for agent in record["agents"]} <= nodes


def test_node_resources_prints_what_ray_start_takes():
    result = subprocess.run(
        [sys.executable, "-m", "metaagent_ray", "node-resources", "--llm", "fake"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # The fake backend holds no model: a slot costs one agent (160 KiB), so on a node with a few GiB free
    # the RAM bound is in the thousands and the cap decides.
    assert json.loads(result.stdout) == {"llm_slot": MAX_SLOTS}


@pytest.mark.parametrize("script", sorted(path.name for path in CLUSTER.glob("*.sh")))
def test_cluster_scripts_are_valid_bash(script: str):
    assert subprocess.run(["bash", "-n", str(CLUSTER / script)]).returncode == 0


def _yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _kuberay_slots(group: dict) -> int:
    """KubeRay passes rayStartParams.resources to `ray start --resources=` as written: a quoted JSON string."""
    return json.loads(json.loads(group["rayStartParams"]["resources"]))["llm_slot"]


def test_the_cluster_launcher_config_gives_every_node_type_llm_slots():
    config = _yaml("cluster.yaml")
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert all(node["resources"]["llm_slot"] >= 1 for node in types.values())
    assert [name for name, node in types.items() if node["resources"].get("GPU")] == ["gpu_worker"]
    assert config["docker"]["image"] == "metaagent-ray:0.1.0"
    assert config["file_mounts"] == {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}
    head = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--include-dashboard=true" in head
    assert all("RAY_AUTH_MODE=token" in command for command in config["worker_start_ray_commands"])


def test_the_kuberay_cluster_offers_llm_slots_on_cpu_and_gpu_workers_with_token_auth():
    cluster = _yaml("kuberay/raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["authOptions"] == {"mode": "token", "secretName": "metaagent-ray-token"}
    assert _kuberay_slots(spec["headGroupSpec"]) >= 1
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    assert {name: _kuberay_slots(group) for name, group in groups.items()} == {"cpu": 8, "gpu": 16}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1"
    images = {
        container["image"]
        for group in [spec["headGroupSpec"], *groups.values()]
        for container in group["template"]["spec"]["containers"]
    }
    assert images == {"metaagent-ray:0.1.0", "metaagent-ray:0.1.0-gpu"}


def test_the_kuberay_job_runs_metaagent_on_that_cluster_with_its_token():
    job = _yaml("kuberay/rayjob.yaml")
    cluster = _yaml("kuberay/raycluster.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    entrypoint = shlex.split(job["spec"]["entrypoint"])
    assert entrypoint[:2] == ["metaagent", "run"] and "--address" not in entrypoint  # Ray's RAY_ADDRESS places it
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    env = {variable["name"]: variable for variable in submitter["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": cluster["spec"]["authOptions"]["secretName"], "key": "auth_token"}


def test_the_dockerfile_installs_metaagent_on_the_ray_version_the_manifests_name():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-" in dockerfile and 'pip install --no-cache-dir "/home/ray/metaagent-ray[local]"' in dockerfile


@pytest.fixture
def fake_ray(tmp_path: Path) -> Path:
    """`ray` and `metaagent` stand-ins on PATH that log their arguments: the scripts' commands, not a cluster."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, output in (("ray", ""), ("metaagent", '{"llm_slot": 3}')):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name} $* RAY_AUTH_MODE=$RAY_AUTH_MODE" >> {tmp_path}/calls\necho \'{output}\'\n')
        script.chmod(0o755)
    return tmp_path


def _script(fake_ray: Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": f"{fake_ray / 'bin'}:/usr/bin:/bin", "HOME": str(fake_ray)}
    return subprocess.run(["bash", str(CLUSTER / script), *args], env={**base, **env}, capture_output=True, text=True, timeout=30)


def test_the_head_script_keeps_jobs_on_binds_where_told_and_makes_a_token(fake_ray: Path):
    result = _script(fake_ray, "start-head.sh", "--dashboard-host", "0.0.0.0", "--llm", "fake")
    assert result.returncode == 0, result.stderr
    calls = (fake_ray / "calls").read_text().splitlines()
    assert calls[0] == "ray get-auth-token --generate RAY_AUTH_MODE=token"
    assert calls[1] == "metaagent node-resources --llm fake RAY_AUTH_MODE=token"
    assert calls[2] == (
        "ray start --head --port=6379 --include-dashboard=true --dashboard-host=0.0.0.0 --dashboard-port=8265 "
        '--resources={"llm_slot": 3} RAY_AUTH_MODE=token'
    )


def test_the_worker_script_without_a_token_says_how_to_get_it(fake_ray: Path):
    result = _script(fake_ray, "start-worker.sh", "10.0.0.5:6379")
    assert result.returncode == 2
    assert "run `ray get-auth-token` on the head" in result.stderr
    assert not (fake_ray / "calls").exists()
    joined = _script(fake_ray, "start-worker.sh", "10.0.0.5:6379", "--llm", "fake", RAY_AUTH_TOKEN="secret")
    assert joined.returncode == 0, joined.stderr
    assert (fake_ray / "calls").read_text().splitlines()[-1] == 'ray start --address=10.0.0.5:6379 --resources={"llm_slot": 3} RAY_AUTH_MODE=token'
