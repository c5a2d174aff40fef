"""A real Ray cluster for tests: `ray start --head --block` and `ray start --address ... --block`.

Each node is its own process group with ports of its own (never Ray's defaults, so other Ray
instances on this machine are untouched) and token authentication on, with a token of its own.
`stop()` ends only the processes this object started, by their ids: never `ray stop`; `kill_node()`
kills one node outright, as a machine that loses power.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).parent / "ray")
START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _free_range(size: int) -> int:
    """The first port of `size` consecutive ports that are free now."""
    for _ in range(200):
        start = 20000 + int.from_bytes(os.urandom(2), "big") % 20000
        ports = range(start, start + size)
        try:
            for port in ports:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return start
    raise RuntimeError("no free port range")


class NodeExited(RuntimeError):
    """A `ray start` process ended while the cluster was coming up."""


@dataclass
class RealCluster:
    """Nodes started by `ray start`, each a process this object owns."""

    temp_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mr-", dir="/tmp")))
    token: str = field(default_factory=lambda: uuid.uuid4().hex + uuid.uuid4().hex)
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: list[subprocess.Popen] = field(default_factory=list)
    logs: dict[int, Path] = field(default_factory=dict)  # each node's output, by its process id
    system_config: dict[str, int] = field(default_factory=dict)  # Ray's internal settings, given to the head (`--system-config`)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a process that talks to this cluster: the token, and no other Ray's address."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
        path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `metaagent` and `ray` of this environment
        return {**env, "PATH": path, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, **extra}

    def _start(self, args: list[str], slots: int, name: str) -> subprocess.Popen:
        worker_ports = _free_range(64)
        ports = {
            "--object-manager-port": free_port(),
            "--node-manager-port": free_port(),
            "--min-worker-port": worker_ports,
            "--max-worker-port": worker_ports + 63,
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
        }
        command = [
            RAY, "start", "--block", *args, "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
            f"--resources={json.dumps({'llm_slot': slots} if slots else {})}", "--num-cpus=2", "--disable-usage-stats",
            *(f"{option}={port}" for option, port in ports.items()),
        ]  # fmt: skip
        log = open(self.temp_dir / f"{name}.log", "wb")
        env = self.env(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # `stop` ends a node at once, without draining it first
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(process)
        self.logs[process.pid] = Path(log.name)
        return process

    def start_head(self, slots: int) -> subprocess.Popen:
        args = [
            "--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
            *([f"--system-config={json.dumps(self.system_config)}"] if self.system_config else []),
        ]  # fmt: skip
        return self._start(args, slots, "head")

    def add_node(self, slots: int) -> subprocess.Popen:
        return self._start([f"--address={self.address}"], slots, f"node{len(self.nodes)}")

    def start(self, head_slots: int, node_slots: int, tries: int = 3) -> None:
        """A head, then one more node once the head is up; a node that exits while it joins (a port
        taken between choosing and binding it, a loaded machine) is started again on fresh ports."""
        self.start_head(head_slots)
        self.wait_for(nodes=1, slots=head_slots)
        for attempt in range(1, tries + 1):
            node = self.add_node(node_slots)
            try:
                self.wait_for(nodes=2, slots=head_slots + node_slots)
                return
            except NodeExited:
                if node.poll() is None or attempt == tries:
                    raise
                self.nodes.remove(node)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.pid, signal.SIGKILL)  # whatever it left behind in its own group

    def wait_for(self, nodes: int, slots: int) -> None:
        """Until `nodes` nodes with `slots` llm_slot in all are up and the job API answers."""
        probe = (
            "import ray, json; ray.init(address=%r, include_dashboard=False, log_to_driver=False);"
            "print(json.dumps([len([n for n in ray.nodes() if n['Alive']]), ray.cluster_resources().get('llm_slot', 0)]))"
        ) % self.address
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for process in self.nodes:
                if process.poll() is not None:
                    log = self.logs[process.pid].read_text(errors="replace")
                    raise NodeExited(f"a node exited: {process.args}; its log ends: {log[-1500:]}")
            result = subprocess.run([sys.executable, "-c", probe], env=self.env(), capture_output=True, text=True, timeout=60)
            if result.returncode == 0 and json.loads(result.stdout.splitlines()[-1]) == [nodes, slots] and self._jobs_ready():
                return
            time.sleep(1)
        raise TimeoutError(f"the cluster did not come up with {nodes} nodes and {slots} slots; see {self.temp_dir}")

    def node_slots(self) -> dict[str, int]:
        """Each live node's id and its llm_slot count."""
        probe = (
            "import ray, json; ray.init(address=%r, include_dashboard=False, log_to_driver=False);"
            "print(json.dumps({n['NodeID']: n['Resources'].get('llm_slot', 0) for n in ray.nodes() if n['Alive']}))"
        ) % self.address
        result = subprocess.run([sys.executable, "-c", probe], env=self.env(), capture_output=True, text=True, timeout=60, check=True)
        return {node: int(slots) for node, slots in json.loads(result.stdout.splitlines()[-1]).items()}

    def _jobs_ready(self) -> bool:
        import urllib.request

        request = urllib.request.Request(f"{self.dashboard_url}/api/version", headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def kill_node(self, node: subprocess.Popen) -> None:
        """Kill one node outright, as a machine that loses power: every process its `ray start` started.

        The raylet starts its workers in process groups of their own, so the node's group is frozen
        first (no new worker can start), then every process found under it is killed by its id. The
        node leaves `nodes`: it is not waited for, and it is not stopped again.
        """
        os.killpg(node.pid, signal.SIGSTOP)
        processes = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        node.wait(timeout=10)
        self.nodes.remove(node)

    def stop(self) -> None:
        """End every process this cluster started (each node's process group), by id."""
        for process in self.nodes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.nodes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)  # what the node left behind in its group
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
