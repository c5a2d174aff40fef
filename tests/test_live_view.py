"""Watching a run: the live view in a real terminal (tmux), the seed's plain lines through a pipe."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

QUERY = "Compare Python, Rust, and Go for web development"
# A row of the live table: agent path, role, layer, state.
ROW = re.compile(r"^\s*(\d+(?:\.\d+)*)\s+([A-Z]+)\s+(\d+)\s+(waiting|queued|running|ok|failed|skipped|reused)\b", re.MULTILINE)


def metaagent_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "metaagent_ray", *args]


@pytest.fixture
def tmux():
    """A tmux server of this test's own (its own socket), killed afterwards."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux): the live view needs a real terminal to test")
    socket = f"metaagent-test-{uuid.uuid4().hex[:8]}"

    def run(*args: str) -> str:
        return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True, check=True).stdout

    yield run
    subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)


def test_the_live_view_updates_in_a_terminal(ray_cluster, tmux, tmp_path: Path):
    run_dir = tmp_path / "run"
    command = metaagent_command(
        "run", QUERY, "--llm", "fake", "--fake-latency", "0.5", "--slots", "2",
        "--address", ray_cluster.address, "--run-dir", str(run_dir),
    )
    # The pane stays after the command ends, so its last screen can be read.
    tmux("new-session", "-d", "-s", "run", "-x", "120", "-y", "50", f"{shlex.join(command)}; echo EXIT=$?; sleep 600")
    states: dict[str, list[str]] = {}  # agent -> the distinct states seen in successive captures
    screens = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-t", "run")
        screens.append(screen)
        for path, _role, _layer, state in ROW.findall(screen):
            seen = states.setdefault(path, [])
            if not seen or seen[-1] != state:
                seen.append(state)
        if "EXIT=" in screen:
            break
        time.sleep(0.2)
    final = screens[-1]
    assert "EXIT=0" in final, final
    changed = {path: seen for path, seen in states.items() if len(seen) > 1}
    assert changed, f"no agent's state changed between captures: {states}"
    assert any("running" in seen and seen[-1] == "ok" for seen in changed.values()), states
    assert any(re.search(r"\d/5 agents done · slots \d/2 in use", screen) for screen in screens)
    # The seed's lines scrolled above the live area, and the final answer follows the run.
    assert "🔀 Execution layers (parallel groups): 3" in "".join(screens)
    assert "✅ [PARALLEL] Agent 4 completed: SYNTHESIZER" in final and "Inputs from agents: 3" in final


def test_a_pipe_gets_the_seed_lines_unchanged(ray_cluster, tmp_path: Path):
    result = subprocess.run(
        metaagent_command("run", QUERY, "--llm", "fake", "--address", ray_cluster.address, "--run-dir", str(tmp_path / "run")),
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "\x1b[" not in result.stdout  # no terminal control sequences
    assert lines[0].startswith("🌐 Ray cluster at ") and lines[0].endswith("LLM slots (llm_slot)")
    # agents of the streamed plan may start (and print) before the coordinator has finished it
    plan_lines = [line for line in lines if not line.startswith(("⚡ [PARALLEL]", "✅ [PARALLEL]"))]
    assert plan_lines[1:5] == [
        "🧭 Coordinator planning with fake (deterministic, no model)...",
        "🧭 Coordinator planned 5 agents",
        "📋 Plan: Parallel research on 3 items, then analysis and synthesis",
        "🔀 Execution layers (parallel groups): 3",
    ]
    assert "  Layer 0: 3 agents in parallel - ['RESEARCHER', 'RESEARCHER', 'RESEARCHER']" in lines
    for agent, role in enumerate(["RESEARCHER", "RESEARCHER", "RESEARCHER", "ANALYZER", "SYNTHESIZER"]):
        assert lines.index(f"⚡ [PARALLEL] Agent {agent}: {role}") < lines.index(f"✅ [PARALLEL] Agent {agent} completed: {role}")
    assert not any(line.startswith(("agent ", "⠋")) for line in lines)  # no live table, no spinner


def test_an_unknown_progress_mode_is_one_line_and_exit_2():
    result = subprocess.run(metaagent_command("run", QUERY, "--llm", "fake", "--progress", "fancy"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --progress fancy: use one of auto, live, plain"
