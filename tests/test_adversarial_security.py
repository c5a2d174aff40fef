"""Security: nothing listens beyond loopback unless asked, hostile text is escaped in the report and
pictures, run directories and the prompt-state cache are not writable (or readable) by others, and
secrets (the Ray token, an API key) reach no output, record or file."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from metaagent_ray import MetaAgent
from metaagent_ray.llm.local.prompt_states import prepare_prefix_cache
from tests.adversarial import TWO_AND_JOIN, invoke, write_plan
from tests.stand_in_server import StandInServer
from tests.test_run_endings import descendants, is_loopback, start, wait_for_line

HOSTILE = '<script>alert(1)</script> "><img src=x onerror=alert(2)> ]]> \x1b[31m\x01 &amp;'


def test_nothing_listens_beyond_loopback_while_the_coordinator_plans_and_agents_start(tmp_path: Path, latency_file):
    latency = latency_file({"default": 60.0, "coordinator": 4.0})  # the streamed plan's first agents start while the coordinator writes
    process = start(
        "run", "Compare A, B and C", "--llm", "fake", "--fake-latency", latency, "--run-dir", str(tmp_path / "run"), session=True
    )
    try:
        wait_for_line(process, "Agent 0: RESEARCHER")
        pids = {process.pid, *(child.pid for child in descendants(process.pid))}
        listening = [sock for sock in psutil.net_connections(kind="inet") if sock.pid in pids and sock.status == psutil.CONN_LISTEN]
        assert listening  # Ray's own servers
        exposed = [(sock.pid, sock.laddr) for sock in listening if not is_loopback(sock.laddr.ip)]
        assert not exposed
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.communicate(timeout=90)


@pytest.mark.usefixtures("ray_session")
def test_hostile_text_in_the_query_plan_and_answers_is_escaped_in_the_report_and_the_pictures(tmp_path: Path):
    plan = {"description": HOSTILE, "agents": [{**agent, "task": f"{agent['task']} {HOSTILE}"} for agent in TWO_AND_JOIN["agents"]]}
    run_dir = tmp_path / "run"
    result = invoke("exec", str(write_plan(tmp_path / "plan.json", plan)), "--llm", "fake", "--query", HOSTILE, "--run-dir", str(run_dir))
    assert result.exit_code == 0, result.output  # the fake agents answer with their task: the answers are hostile too
    report = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "<script" not in report and "<img" not in report and report.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 7
    for picture in ("graph.svg", "timeline.svg"):
        svg = ElementTree.parse(run_dir / picture).getroot()  # well-formed XML despite the control characters
        assert not [element for element in svg.iter() if element.tag.rsplit("}", 1)[-1] in ("script", "img", "foreignObject")]
    assert "<script" not in (run_dir / "graph.mmd").read_text(encoding="utf-8")


def modes(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): stat.S_IMODE(path.stat().st_mode) for path in [root, *root.rglob("*")]}


@pytest.fixture
def umask_0() -> Iterator[None]:
    """The most permissive umask a user can have: nothing the run makes may become writable by others through it."""
    earlier = os.umask(0)
    try:
        yield
    finally:
        os.umask(earlier)


@pytest.mark.usefixtures("ray_session", "umask_0")
def test_run_directories_and_their_files_are_never_writable_by_others_even_under_umask_0(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = write_plan(tmp_path / "plan.json")
    assert invoke("exec", str(plan), "--llm", "fake").exit_code == 0  # under ./runs, made by the run
    assert invoke("exec", str(plan), "--llm", "fake", "--run-dir", str(tmp_path / "new" / "parents" / "run")).exit_code == 0
    found = {**modes(tmp_path / "runs"), **modes(tmp_path / "new")}
    assert len(found) > 20
    writable = {path: oct(mode) for path, mode in found.items() if mode & (stat.S_IWGRP | stat.S_IWOTH)}
    assert not writable


@pytest.mark.usefixtures("umask_0")
def test_the_prompt_state_cache_is_the_users_alone(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    loose = tmp_path / "metaagent-ray" / "prompt-states"
    loose.mkdir(parents=True, mode=0o777)  # as an older version, or someone else, left it
    assert prepare_prefix_cache() == loose
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700  # the model reads these states back: no one else may read or replace them


@pytest.mark.usefixtures("ray_session")
def test_an_api_key_given_as_an_option_is_sent_to_the_server_and_kept_nowhere(tmp_path: Path):
    key = "sk-adversarial-0123456789"
    with StandInServer(api="openai") as server:
        options = {"base_url": server.base_url, "api_key": key}
        record = MetaAgent(llm="openai", model="test-model", llm_options=options).execute(TWO_AND_JOIN, "q", run_dir=tmp_path / "run")
        assert record.status == "ok"
        assert all(headers["authorization"] == f"Bearer {key}" for headers in server.chat_headers())
    leaks = [path for path in (tmp_path / "run").rglob("*") if path.is_file() and key in path.read_text(encoding="utf-8", errors="replace")]
    assert not leaks
    assert record.settings["llm_options"] == {"base_url": server.base_url}


def test_the_ray_token_is_the_users_alone_and_reaches_no_output_or_file_even_with_v(tmp_path: Path):
    """Ray started here turns token authentication on, with the token in ~/.ray/auth_token (here a fresh home)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("RAY_AUTH_MODE", None)
    command = [sys.executable, "-m", "metaagent_ray", "exec", str(write_plan(tmp_path / "plan.json")), "--llm", "fake", "-v"]
    done = subprocess.run([*command, "--run-dir", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    token_file = home / ".ray" / "auth_token"
    token = token_file.read_text().strip()
    assert len(token) >= 32 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    written = [path for path in (tmp_path / "run").rglob("*") if path.is_file()]
    assert len(written) > 5
    for text in (done.stdout, done.stderr, *(path.read_text(errors="replace") for path in written)):
        assert token not in text
