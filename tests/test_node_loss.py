"""A node of a real `ray start` cluster dies mid-run: its agents run again elsewhere, or the run stops in one line.

Each test starts its own head and worker with `ray start --block` (token auth on, ports of their own),
runs a 30-agent plan with the CLI in a process of its own (the driver, as a user runs it), and kills
every process of the worker node (its `ray start`, raylet and workers) once the worker is known to
hold agents: the driver's start and finish lines count the agents in flight, and when they fill every
LLM slot of the run, each node runs its share. Ray's health checks are shortened on these clusters
only, so the GCS marks the killed node dead within about 1.5 s instead of about 15 s.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from metaagent_ray.executors import NoSlotsLeft, SlotPool
from tests.real_cluster import RealCluster

HEAD_SLOTS, NODE_SLOTS = 4, 3
JOINING_SLOTS = 6  # the node that joins before the resume
HEALTH_CHECKS = {  # Ray's defaults: a first check after 5 s, then every 3 s, dead after 5 failures
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 5000,  # a live but busy node still has 5 s to answer; a dead one fails at once
    "health_check_failure_threshold": 3,
}
METAAGENT = [sys.executable, "-m", "metaagent_ray"]
RUN_TIMEOUT_S = 120


@pytest.fixture
def start_cluster() -> Iterator[Callable[[int, int], RealCluster]]:
    """Start a head with `head_slots` LLM slots and a worker with `node_slots`; stopped after the test."""
    clusters: list[RealCluster] = []

    def start(head_slots: int, node_slots: int) -> RealCluster:
        cluster = RealCluster(system_config=HEALTH_CHECKS)
        clusters.append(cluster)
        cluster.start(head_slots, node_slots)
        return cluster

    yield start
    for cluster in clusters:
        cluster.stop()


@pytest.fixture
def exec_plan(tmp_path: Path) -> Iterator[Callable[[RealCluster], Driver]]:
    """Start `metaagent exec` of the plan on a cluster; a driver the test left running is killed after it."""
    drivers: list[Driver] = []

    def start(cluster: RealCluster) -> Driver:
        drivers.append(Driver(cluster, tmp_path))
        return drivers[-1]

    yield start
    for driver in drivers:
        if driver.process.poll() is None:
            driver.process.kill()
            driver.process.wait()


def thirty_agents(path: Path) -> Path:
    """24 researchers, 4 analysts of 6 researchers each, a critic of the analysts and a synthesizer."""
    agents = [{"role": "RESEARCHER", "task": f"Research topic {index}", "depends_on": []} for index in range(24)]
    agents += [{"role": "ANALYZER", "task": f"Analyze topics {6 * group}-{6 * group + 5}", "depends_on": list(range(6 * group, 6 * group + 6))} for group in range(4)]  # fmt: skip
    agents += [{"role": "CRITIC", "task": "Critique the analyses", "depends_on": [24, 25, 26, 27]}]
    agents += [{"role": "SYNTHESIZER", "task": "Write the report", "depends_on": [28]}]
    path.write_text(json.dumps({"description": "Thirty agents", "agents": agents}))
    return path


class Driver:
    """`metaagent exec` of the plan on the cluster, in a process of its own; its lines are read as they come."""

    def __init__(self, cluster: RealCluster, base: Path) -> None:
        self.run_dir = base / "run"
        self.stderr = base / "stderr.txt"
        command = [*METAAGENT, "exec", str(thirty_agents(base / "plan.json")), "--llm", "fake", "--fake-latency", "1",
                   "--address", cluster.address, "--run-dir", str(self.run_dir), "--progress", "plain"]  # fmt: skip
        with self.stderr.open("w") as stderr:
            self.process = subprocess.Popen(command, env=cluster.env(), cwd=base, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.lines: list[str] = []
        self.finished: set[int] = set()  # agents whose finish line came

    def until_in_flight(self, slots: int, finished: int = 0) -> None:
        """Read until `slots` agents are in flight, after at least `finished` agents finished."""
        assert self.process.stdout is not None
        in_flight = 0
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("⚡ [PARALLEL] Agent"):
                in_flight += 1
            elif done := re.match(r"(✅|❌) \[PARALLEL\] Agent (\d+)", line):
                in_flight -= 1
                self.finished.add(int(done.group(2)))
            if in_flight == slots and len(self.finished) >= finished:
                return
        raise AssertionError(f"the run ended before {slots} agents were in flight:\n{''.join(self.lines)}{self.stderr.read_text()}")

    def end(self) -> tuple[str, str]:
        """The rest of its output and its error output, once it exited."""
        output = self.process.communicate(timeout=RUN_TIMEOUT_S)[0]
        self.lines.append(output)
        return "".join(self.lines), self.stderr.read_text()

    def record(self) -> dict:
        return json.loads((self.run_dir / "record.json").read_text())


def test_a_lost_worker_s_agents_run_again_on_the_head_and_the_run_ends_ok(start_cluster, exec_plan):
    cluster = start_cluster(HEAD_SLOTS, NODE_SLOTS)
    nodes = cluster.node_slots()
    head = next(node for node, slots in nodes.items() if slots == HEAD_SLOTS)
    worker = next(node for node, slots in nodes.items() if slots == NODE_SLOTS)
    driver = exec_plan(cluster)
    driver.until_in_flight(HEAD_SLOTS + NODE_SLOTS)  # every slot busy: NODE_SLOTS agents run on the worker
    cluster.kill_node(cluster.nodes[1])
    output, errors = driver.end()
    assert driver.process.returncode == 0, output + errors
    record = driver.record()
    assert record["status"] == "ok"
    assert [agent["status"] for agent in record["agents"]] == ["ok"] * 30
    again = [agent for agent in record["agents"] if agent["attempts"] > 1]
    where = [(agent["id"], agent["node"], agent["attempts"]) for agent in record["agents"]]
    assert 1 <= len(again) <= NODE_SLOTS, f"(agent, node, attempts): {where}\n{output}"
    assert all(agent["node"] == head and agent["attempts"] == 2 for agent in again), where
    assert all(f"⚡ [PARALLEL] Agent {agent['id']}: {agent['role']} (attempt 2)" in output for agent in again)
    assert {agent["node"] for agent in record["agents"]} <= {head, worker}
    lost = re.compile(rf"⚠️ Ray node {worker} \(\S+\) was lost; its agents run again on the 1 node left")
    assert [warning for warning in record["warnings"] if lost.fullmatch(warning)], record["warnings"]
    assert lost.search(output)


def test_with_no_slot_left_the_run_fails_in_one_line_and_resume_finishes_it_once_a_node_joins(start_cluster, exec_plan, tmp_path: Path):
    cluster = start_cluster(0, NODE_SLOTS)  # the head has no LLM slot: every agent runs on the worker
    worker = next(node for node, slots in cluster.node_slots().items() if slots)
    driver = exec_plan(cluster)
    driver.until_in_flight(NODE_SLOTS, finished=NODE_SLOTS)  # some agents finished, the next ones run on the worker
    cluster.kill_node(cluster.nodes[1])
    output, errors = driver.end()
    assert driver.process.returncode == 1, output + errors
    run_dir = re.escape(str(driver.run_dir))
    assert re.fullmatch(
        rf"error: Ray node {worker} \(\S+\) was lost, and no other node holds LLM slots for this run; "
        rf"the agents that finished are saved in {run_dir}; resume with: metaagent resume {run_dir}\n",
        errors,
    ), errors
    record = driver.record()
    assert record["status"] == "failed"
    saved = {agent["id"] for agent in record["agents"] if agent["status"] == "ok"}
    said = {int(agent) for agent in re.findall(r"^✅ \[PARALLEL\] Agent (\d+)", output, re.MULTILINE)}
    assert driver.finished <= saved == said, output  # every agent it said finished, and nothing else
    assert {agent["status"] for agent in record["agents"] if agent["id"] not in saved} == {"pending"}

    cluster.add_node(JOINING_SLOTS)
    cluster.wait_for(nodes=2, slots=JOINING_SLOTS)
    joined = next(node for node, slots in cluster.node_slots().items() if slots == JOINING_SLOTS)
    resumed = subprocess.run(
        [*METAAGENT, "resume", str(driver.run_dir), "--progress", "plain"],  # the cluster's address is the run's own
        env=cluster.env(), cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    record = driver.record()
    assert record["status"] == "ok"
    assert {agent["id"] for agent in record["agents"] if agent["reused"]} == saved
    assert {agent["node"] for agent in record["agents"] if not agent["reused"]} == {joined}


def test_an_agent_waiting_for_a_slot_is_told_when_the_last_node_with_slots_is_dropped():
    async def lose_both_nodes() -> None:
        pool = SlotPool({0: 1, 1: 1})
        first, second = await pool.acquire(1), await pool.acquire(1)
        waiting = asyncio.ensure_future(pool.acquire(1))
        assert pool.drop(first) and not pool.drop(first)  # each node is lost once
        await asyncio.sleep(0)  # the waiter runs: it still waits for the node left
        assert not waiting.done()
        assert pool.drop(second)
        with pytest.raises(NoSlotsLeft):
            await waiting
        with pytest.raises(NoSlotsLeft):
            await pool.acquire(1)

    asyncio.run(lose_both_nodes())
