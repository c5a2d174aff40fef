"""Submitting to an existing Ray cluster: a separate driver process connects with --address."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    resources = json.loads(result.stdout)
    assert list(resources) == ["llm_slot"] and resources["llm_slot"] >= 1


@pytest.mark.parametrize("script", sorted(path.name for path in CLUSTER.glob("*.sh")))
def test_cluster_scripts_are_valid_bash(script: str):
    assert subprocess.run(["bash", "-n", str(CLUSTER / script)]).returncode == 0
