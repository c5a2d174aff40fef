"""Every Ray connection is bounded: a dead, silent or wrong address is one line and exit 2 well within
60 s, and a run that never started leaves no run directory behind."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES

PLAN = str(EXAMPLES / "parallel_research.json")


def _exec(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | env
    return subprocess.run(
        [sys.executable, "-m", "metaagent_ray", "exec", PLAN, "--llm", "fake", *args],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60,  # the bound the issue asks for
    )  # fmt: skip


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_port():
    """A port that accepts connections and never says anything, as a hung head would."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the server closes at the end of the test
            while True:
                accepted.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def _one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("via", ["--address", "RAY_ADDRESS"])
def test_a_refusing_address_fails_at_once_and_leaves_no_run_directory(tmp_path: Path, via: str):
    address = f"127.0.0.1:{_closed_port()}"
    result = _exec(tmp_path, "--address", address) if via == "--address" else _exec(tmp_path, RAY_ADDRESS=address)
    assert result.returncode == 2
    assert _one_line(result) == (
        f"error: cannot reach the Ray cluster at {address}: connection refused; check that its head runs "
        f"(`ray start --head --port {address.split(':')[1]}`) and that this machine can reach 127.0.0.1 on port {address.split(':')[1]}"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_address_that_accepts_but_never_answers_is_bounded(tmp_path: Path, silent_port: int):
    result = _exec(tmp_path, "--address", f"127.0.0.1:{silent_port}")
    assert result.returncode == 2
    assert _one_line(result) == f"error: the Ray cluster at 127.0.0.1:{silent_port} accepted a connection but its GCS did not answer within 15 s"
    assert list(tmp_path.iterdir()) == []


def test_address_auto_without_a_cluster_started_here_is_one_line(tmp_path: Path, tmp_path_factory):
    ray_tmp = tmp_path_factory.mktemp("ray-tmp")  # where `ray start` would leave its address: nothing there
    result = _exec(tmp_path, "--address", "auto", RAY_TMPDIR=str(ray_tmp))
    assert result.returncode == 2
    assert _one_line(result) == "error: --address auto: no Ray cluster started with `ray start` runs on this machine"
    assert list(tmp_path.iterdir()) == []


def test_address_auto_finds_the_address_ray_start_left_and_checks_it_like_any_other(tmp_path: Path, tmp_path_factory):
    ray_tmp = tmp_path_factory.mktemp("ray-tmp")
    port = _closed_port()  # a head that died and left its address behind
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
    result = _exec(tmp_path, "--address", "auto", RAY_TMPDIR=str(ray_tmp))
    assert result.returncode == 2
    assert _one_line(result).startswith(f"error: cannot reach the Ray cluster at 127.0.0.1:{port}: connection refused")
    assert list(tmp_path.iterdir()) == []


def test_a_dashboard_url_given_to_a_driver_says_to_submit(tmp_path: Path):
    result = _exec(tmp_path, RAY_ADDRESS="http://127.0.0.1:8265")
    assert result.returncode == 2
    assert "metaagent submit --address http://127.0.0.1:8265" in _one_line(result)
    assert list(tmp_path.iterdir()) == []


def test_submit_to_a_dead_dashboard_is_one_line(tmp_path: Path):
    port = _closed_port()
    result = subprocess.run(
        [sys.executable, "-m", "metaagent_ray", "submit", "--plan", PLAN, "--llm", "fake", "--address", f"http://127.0.0.1:{port}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert _one_line(result).startswith(f"error: cannot reach the Ray cluster at http://127.0.0.1:{port}: connection refused")
