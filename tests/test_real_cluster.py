"""A real multi-process Ray cluster: `ray start` head and second node, token auth on, their own ports.

Three ways a Ray user runs on it: a separate driver with RAY_ADDRESS, `ray job submit` of
`metaagent exec` through the head's job API (with and without --working-dir), and
`metaagent submit`. Each record must show agents on both nodes and the cluster's slot count.
A node lost mid-run: tests/test_node_loss.py.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES
from tests.real_cluster import RAY, RealCluster

HEAD_SLOTS, NODE_SLOTS = 2, 3  # 6 independent agents in the plan: more than either node, so both work
PLAN = EXAMPLES / "software_architecture.json"
METAAGENT = [sys.executable, "-m", "metaagent_ray"]


@pytest.fixture(scope="module")
def cluster():
    cluster = RealCluster()
    try:
        cluster.start(HEAD_SLOTS, NODE_SLOTS)
        yield cluster
    finally:
        cluster.stop()


def _run(cluster: RealCluster, base: Path, way: str) -> tuple[subprocess.CompletedProcess, Path]:
    """One way of running the plan on the cluster, alone (runs at once would share the slots, and
    one of them could land on one node only); returns how it ended and its run directory.

    The six independent agents take 3 s: longer than a new Ray worker takes to start here, so one
    node's first worker cannot take them all in turn while the other node's workers start.
    """
    run_dir = base / "run"
    latency = base / "latency.json"
    latency.write_text(json.dumps({"default": 0.2, **{str(root): 3.0 for root in range(6)}}))
    fake = ["--llm", "fake", "--fake-latency", str(latency)]
    job = [RAY, "job", "submit", "--address", cluster.dashboard_url]
    if way == "job-working-dir":
        (base / "job").mkdir()
        shutil.copy(PLAN, base / "job" / "plan.json")
    command, env = {
        "driver": ([*METAAGENT, "exec", str(PLAN), *fake, "--run-dir", str(run_dir)], {"RAY_ADDRESS": cluster.address}),
        "job": ([*job, "--", "metaagent", "exec", str(PLAN), *fake, "--run-dir", str(run_dir)], {}),
        "job-working-dir": ([*job, "--working-dir", str(base / "job"), "--", "metaagent", "exec", "plan.json", *fake, "--run-dir", str(run_dir)], {}),
        "submit": ([*METAAGENT, "submit", "--plan", str(PLAN), *fake, "--address", cluster.dashboard_url, "--run-dir", str(run_dir),
                    "--env", "METAAGENT_TEST=1"], {}),
    }[way]  # fmt: skip
    result = subprocess.run(command, env=cluster.env(**env), cwd=base, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result, run_dir


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "record.json").read_text())


def _assert_ran_on_both_nodes(record: dict, cluster: RealCluster) -> None:
    assert record["status"] == "ok"
    assert record["slots"] == HEAD_SLOTS + NODE_SLOTS
    assert {agent["node"] for agent in record["agents"]} == set(cluster.node_slots())


def test_a_driver_with_ray_address_runs_on_the_cluster(cluster: RealCluster, tmp_path: Path):
    result, run_dir = _run(cluster, tmp_path, "driver")
    assert result.stdout.splitlines()[0].endswith(f"2 nodes, {HEAD_SLOTS + NODE_SLOTS} LLM slots (llm_slot)")
    _assert_ran_on_both_nodes(_record(run_dir), cluster)


def test_address_auto_on_the_head_finds_the_cluster_ray_start_started(cluster: RealCluster, tmp_path: Path):
    (tmp_path / "ray").mkdir()  # as `ray start` leaves it in /tmp/ray, here under RAY_TMPDIR
    shutil.copyfile(cluster.temp_dir / "ray_current_cluster", tmp_path / "ray" / "ray_current_cluster")
    command = [*METAAGENT, "exec", str(EXAMPLES / "parallel_research.json"), "--llm", "fake", "--address", "auto", "--run-dir", str(tmp_path / "run")]
    result = subprocess.run(command, env=cluster.env(RAY_TMPDIR=str(tmp_path)), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0].endswith(f":{cluster.gcs_port}: 2 nodes, {HEAD_SLOTS + NODE_SLOTS} LLM slots (llm_slot)")


@pytest.mark.parametrize("way", ["job", "job-working-dir"])
def test_ray_job_submit_runs_metaagent_exec_on_the_cluster(cluster: RealCluster, tmp_path: Path, way: str):
    result, run_dir = _run(cluster, tmp_path, way)
    assert f"2 nodes, {HEAD_SLOTS + NODE_SLOTS} LLM slots (llm_slot)" in result.stdout
    _assert_ran_on_both_nodes(_record(run_dir), cluster)


def test_metaagent_submit_brings_the_run_directory_back(cluster: RealCluster, tmp_path: Path):
    result, back = _run(cluster, tmp_path, "submit")
    assert "🚀 Submitted Ray job raysubmit_" in result.stderr
    assert "✅ [PARALLEL] Agent 14 completed: SYNTHESIZER" in result.stdout  # the job's log, followed live
    assert "metaagent run directory" not in result.stdout
    record = _record(back)
    _assert_ran_on_both_nodes(record, cluster)
    assert record["run_dir"] == str(back)
    assert {"plan.json", "final.md", "graph.svg", "timeline.svg"} <= {path.name for path in back.iterdir()}
    assert len(list((back / "agents").iterdir())) == 15


def test_without_the_token_one_line_says_how_to_get_it(cluster: RealCluster, tmp_path: Path):
    env = cluster.env(RAY_ADDRESS=cluster.address)
    del env["RAY_AUTH_TOKEN"], env["RAY_AUTH_MODE"]
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    result = subprocess.run([*METAAGENT, "exec", str(PLAN), "--llm", "fake"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: the Ray cluster at {cluster.address} requires an authentication token (token authentication is on): "
        "run `ray get-auth-token` on the head, then here export RAY_AUTH_TOKEN=<token> RAY_AUTH_MODE=token"
    ]
    assert list(tmp_path.iterdir()) == []


def test_no_wait_then_ctrl_c_detaches_and_attach_brings_the_run_back(cluster: RealCluster, tmp_path: Path):
    metaagent = [*METAAGENT, "submit", "--address", cluster.dashboard_url]
    submitted = subprocess.run(
        [*metaagent, "--plan", str(PLAN), "--llm", "fake", "--fake-latency", "3", "--no-wait"],  # still running when Ctrl-C comes
        env=cluster.env(), cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert job_id.startswith("raysubmit_")
    following = subprocess.Popen(
        [*metaagent, "--attach", job_id], env=cluster.env(), cwd=tmp_path,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert following.stdout is not None
    for line in following.stdout:
        if line.startswith("⚡ [PARALLEL] Agent"):
            break
    following.send_signal(signal.SIGINT)
    _, stderr = following.communicate("d\n", timeout=60)
    assert following.returncode == 0, stderr
    assert f"Detached; job {job_id} runs on. Follow it again with: metaagent submit --attach {job_id}" in stderr
    back = tmp_path / "back"
    attached = subprocess.run(
        [*metaagent, "--attach", job_id, "--run-dir", str(back)], env=cluster.env(), cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert attached.returncode == 0, attached.stderr
    assert attached.stdout.count("✅ [PARALLEL] Agent 14 completed") == 1  # the whole log once, from the start
    _assert_ran_on_both_nodes(_record(back), cluster)
