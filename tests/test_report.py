"""report.html: one self-contained page per run, rendered by a real browser (headless Chromium)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from html import escape
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metaagent_ray import MetaAgent
from metaagent_ray.api import load_record
from metaagent_ray.cli import app

# A task that would run a script, and set a window flag the page shows, if the report did not escape it.
ATTACK = "<script>window.pwned = true; document.documentElement.setAttribute('data-pwned', 'yes')</script>"
PLAN = {
    "description": "Research <b>two</b> things, then compare",
    "agents": [
        {"role": "RESEARCHER", "task": f"Research A {ATTACK}", "depends_on": []},
        {"role": "RESEARCHER", "task": 'Research B & <img src=x onerror="window.pwned=true">', "depends_on": []},
        {"role": "ANALYZER", "task": "Compare A and B", "depends_on": [0, 1]},
    ],
}


def chromium_binary() -> str | None:
    """Debian's `chromium`, installed with apt-get when missing and this process may install packages."""
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=1200)
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("Chromium is not installed and cannot be installed here (needs root and apt-get: apt-get install chromium)")
    return binary


def headless(chromium: str, *args: str) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"]
    return subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=120)


def png_size_and_colours(path: Path) -> tuple[int, int, int]:
    """Width, height and the number of distinct byte values of a PNG's pixel data (1 means a blank image)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    chunks, position = [], 8
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        if kind == b"IDAT":
            chunks.append(data[position + 8 : position + 8 + length])
        position += 12 + length
    pixels = zlib.decompress(b"".join(chunks))
    return width, height, len(set(pixels))


@pytest.fixture(scope="module")
def run_dir(ray_session, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("report") / "run"
    with MetaAgent(llm="fake") as agent:
        record = agent.execute(PLAN, 'Compare <A> & "B"', run_dir=directory)
    assert record.status == "ok"
    return directory


def test_every_run_directory_has_a_self_contained_report(run_dir: Path):
    page = (run_dir / "report.html").read_text()
    assert "<script" not in page.replace(escape("<script"), "")  # no script of its own, none injected
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert escape(PLAN["agents"][0]["task"]) in page
    assert 'href="#agent-0"' in page  # the analyzer's inputs link to the agents they came from


def test_chromium_renders_the_report_and_runs_no_injected_script(chromium: str, run_dir: Path, tmp_path: Path):
    url = (run_dir / "report.html").resolve().as_uri()
    dom = headless(chromium, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr
    page = dom.stdout
    record = load_record(run_dir)
    for agent in record.agents:
        assert f"Agent {agent.id} · {agent.role}" in page
        assert escape(agent.task, quote=False) in page
        assert escape(agent.output, quote=False) in page
    assert 'id="graph"' in page and 'id="timeline"' in page
    assert page.count("<svg") >= 2 and "Agent 2 · ANALYZER ✓" in page  # the graph, as an inline SVG
    assert "Ray start-up" in page or "Agent 0 · RESEARCHER (layer 0)" in page  # the timeline's rows
    assert 'data-pwned="yes"' not in page, "a script from the task ran in the report"

    screenshot = tmp_path / "report.png"
    shot = headless(chromium, "--window-size=1200,1600", f"--screenshot={screenshot}", url)
    assert shot.returncode == 0 and screenshot.exists(), shot.stderr
    width, height, colours = png_size_and_colours(screenshot)
    assert width > 800 and height > 800
    assert colours > 20, "the screenshot is blank"


def test_the_report_command_rebuilds_the_page(run_dir: Path):
    (run_dir / "report.html").unlink()
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "report.html").exists() and str(run_dir / "report.html") in result.output
    missing = CliRunner().invoke(app, ["report", str(run_dir / "nope")])
    assert missing.exit_code == 2 and "not a run directory" in missing.output


def open_report(run_dir: Path, tmp_path: Path, *, browser_exit: int) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`metaagent report RUN_DIR --open` with a stand-in browser: $BROWSER names a script that writes the address
    it is asked to open to a file and exits `browser_exit`; no other browser is found (no display, an empty PATH)."""
    asked, script, empty = tmp_path / "asked.txt", tmp_path / "browser", tmp_path / "empty"
    script.write_text(f'#!/bin/sh\nprintf "%s" "$1" > "{asked}"\nexit {browser_exit}\n')
    script.chmod(0o755)
    empty.mkdir()
    environment = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "WAYLAND_DISPLAY")}
    environment.update(BROWSER=str(script), PATH=str(empty))
    command = [sys.executable, "-m", "metaagent_ray", "report", str(run_dir), "--open"]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120), asked


def test_report_open_asks_the_browser_for_the_report(run_dir: Path, tmp_path: Path):
    result, asked = open_report(run_dir, tmp_path, browser_exit=0)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(run_dir / "report.html")
    assert asked.read_text() == (run_dir / "report.html").resolve().as_uri()


def test_report_open_without_a_browser_that_opens_it_is_one_line_and_exit_1(run_dir: Path, tmp_path: Path):
    result, asked = open_report(run_dir, tmp_path, browser_exit=1)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: no web browser found to open {run_dir / 'report.html'}; open it yourself"
    assert asked.read_text() == (run_dir / "report.html").resolve().as_uri()  # it was asked, and said no


def test_ray_timeline_writes_rays_chrome_trace_of_the_run(ray_session, tmp_path: Path):
    trace = tmp_path / "trace" / "ray.json"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(PLAN))
    result = CliRunner().invoke(app, ["exec", str(plan), "--llm", "fake", "--run-dir", str(tmp_path / "run"), "--ray-timeline", str(trace)])
    assert result.exit_code == 0, result.output
    events = json.loads(trace.read_text())
    assert isinstance(events, list) and any(event.get("name") == "run" for event in events)  # an executor ran an agent
