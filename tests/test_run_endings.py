"""Every way a run ends is a clean end: signals, dead Ray parts, killed drivers, locked and refused
run directories, and bad paths found before anything runs (the reliability issue, item by item)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import psutil
import pytest
from typer.testing import CliRunner

from metaagent_ray import AgentStarted, MetaAgent, load_plan, run_directory
from metaagent_ray.cli import app
from metaagent_ray.record import RunRecord
from metaagent_ray.run_directory import CHECKPOINT_INTERVAL_S, RunDirectory
from tests.conftest import DELEGATING_PLAN, EXAMPLES

PLAN = EXAMPLES / "business_plan.json"  # 0,1,2,3 -> 4(0,1), 5(0,1) -> 6(2,4), 7(3,4) -> 8(5,6,7)


def load(run_dir: Path) -> RunRecord:
    return RunRecord.model_validate_json((run_dir / "record.json").read_text())


def start(*args: str, session: bool = False) -> subprocess.Popen[str]:
    """`metaagent ARGS` in a process group of its own, as a terminal runs a foreground command."""
    return subprocess.Popen(
        [sys.executable, "-m", "metaagent_ray", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=session,
    )


def wait_for_line(process: subprocess.Popen[str], text: str, timeout: float = 90.0) -> list[str]:
    """Read stdout until a line holds `text`; returns the lines read. Fails with what the command printed
    if its output ends first (it exited), or if `timeout` seconds pass (then it is killed: a silent
    command cannot hold the test forever)."""
    assert process.stdout is not None
    lines: list[str] = []
    timed_out = threading.Event()
    watchdog = threading.Timer(timeout, lambda: (timed_out.set(), process.kill()))
    watchdog.start()
    try:
        for line in process.stdout:
            lines.append(line)
            if text in line:
                return lines
    finally:
        watchdog.cancel()
    code = process.wait(timeout=30)
    errors = process.stderr.read() if process.stderr else ""
    why = f"killed after {timeout:g} s" if timed_out.is_set() else f"exit code {code}"
    raise AssertionError(f"never printed {text!r} ({why}); printed {lines}; stderr {errors}")


def until(condition: Callable[[], object], what: str, timeout: float = 90.0) -> None:
    """Wait until `condition()` holds; fail naming `what` never happened if `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.01)


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


# --- item 2: a run directory belongs to one run -------------------------------------------------


@pytest.mark.usefixtures("ray_session")
def test_an_existing_run_directory_is_refused_not_overwritten(tmp_path: Path):
    run_dir = tmp_path / "run"
    assert CliRunner().invoke(app, ["exec", str(PLAN), "--llm", "fake", "--run-dir", str(run_dir)]).exit_code == 0
    before = (run_dir / "record.json").read_text()
    again = CliRunner().invoke(app, ["exec", str(PLAN), "--llm", "fake", "--fake-fail", "3", "--run-dir", str(run_dir)])
    assert again.exit_code == 2
    assert again.output.strip().splitlines() == [
        f"error: --run-dir {run_dir}: the directory is not empty (a run directory belongs to one run); "
        f"to continue that run: metaagent resume {run_dir}"
    ]
    assert (run_dir / "record.json").read_text() == before


# --- item 3: sub-plan agents are checkpointed the moment they finish -----------------------------


def sub_agent_statuses(run_dir: Path) -> list[str] | None:
    """The statuses of agent 0's sub-agents in the record on disk now; None before there are any."""
    try:
        sub_run = load(run_dir).agents[0].sub_run
    except (OSError, ValueError):  # no record written yet
        return None
    return [agent.status for agent in sub_run.agents] if sub_run is not None else None


def test_finished_sub_agents_survive_a_killed_driver_and_resume_reuses_them(ray_cluster, tmp_path: Path, latency_file):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(DELEGATING_PLAN))
    run_dir = tmp_path / "run"
    latency = latency_file({"default": 0.1, "2": 60.0})  # sub-agent 0.2 (and the final agent 2) are slow
    process = start("exec", str(plan_file), "--llm", "fake", "--fake-latency", latency, "--max-depth", "1",
                    "--address", ray_cluster.address, "--run-dir", str(run_dir))
    wait_for_line(process, "Agent 0.1 completed")
    # The record is checkpointed within CHECKPOINT_INTERVAL_S, with no further event needed (0.2 runs a minute).
    until(lambda: sub_agent_statuses(run_dir) == ["ok", "ok", "pending"], "checkpointed sub-agents 0.0 and 0.1 while 0.2 runs")
    process.kill()
    process.wait(timeout=30)

    killed = load(run_dir)
    assert killed.status == "running"  # nothing can write after SIGKILL; resume finishes it
    parent = killed.agents[0]
    assert parent.status == "pending" and parent.sub_run is not None
    assert [agent.status for agent in parent.sub_run.agents] == ["ok", "ok", "pending"]
    assert sorted(path.name for path in (run_dir / "agents").iterdir())[:2] == ["00-00-researcher.md", "00-01-analyzer.md"]

    resumed = CliRunner().invoke(app, ["resume", str(run_dir), "--llm", "fake", "--fake-latency", "0"])
    assert resumed.exit_code == 0, resumed.output
    assert "continuing the sub-plans of agents [0]" in resumed.output
    after = load(run_dir)
    assert after.status == "ok"
    sub_agents = after.agents[0].sub_run.agents
    assert [agent.reused for agent in sub_agents] == [True, True, False]
    for earlier, now in zip(parent.sub_run.agents[:2], sub_agents[:2]):
        assert now.started_at == earlier.started_at and now.output == earlier.output
    assert "⚡ [PARALLEL] Agent 0.0" not in resumed.output and "✅ [PARALLEL] Agent 0.2 completed" in resumed.output


def test_the_record_is_written_at_most_once_an_interval_and_held_changes_are_due_by_its_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    now = [1000.0]  # the run directory's clock, moved by hand
    monkeypatch.setattr(run_directory, "time", SimpleNamespace(monotonic=lambda: now[0]))
    record = RunRecord.start(load_plan(PLAN), "q")
    directory = RunDirectory.create(tmp_path / "run", "q")
    directory.start(record)

    def change(text: str, after: float) -> None:
        now[0] += after * CHECKPOINT_INTERVAL_S
        record.warnings.append(text)
        directory.record_changed()

    def on_disk() -> list[str]:
        return load(tmp_path / "run").warnings

    assert on_disk() == [] and directory.checkpoint_due_in() is None  # written as the run starts; nothing held
    change("a", after=0.25)
    change("b", after=0.25)
    assert on_disk() == []  # held: within an interval of the last write
    assert directory.checkpoint_due_in() == pytest.approx(0.5 * CHECKPOINT_INTERVAL_S)  # the runtime waits no longer than this
    change("c", after=0.5)
    assert on_disk() == ["a", "b", "c"]  # an interval after the last write: one write holds them all
    change("d", after=0.25)
    directory.checkpoint()  # the runtime's wait ran out with no event: what is held is written
    assert on_disk() == ["a", "b", "c", "d"] and directory.checkpoint_due_in() is None
    (tmp_path / "run" / "record.json").unlink()
    directory.checkpoint()
    assert not (tmp_path / "run" / "record.json").exists()  # nothing changed since: nothing written


# --- item 4: a dead hub actor ends the run `failed`, with the resume command ---------------------


def hub_processes() -> set[int]:
    return {process.pid for process in psutil.process_iter(["cmdline"]) if any("RunHub" in part for part in process.info["cmdline"] or [])}


def test_a_killed_hub_actor_ends_the_run_failed_with_one_line_and_the_resume_command(ray_cluster, tmp_path: Path, latency_file):
    run_dir = tmp_path / "run"
    latency = latency_file({"default": 0.1, "8": 60.0})
    hubs_before = hub_processes()
    process = start("exec", str(PLAN), "--llm", "fake", "--fake-latency", latency, "--address", ray_cluster.address, "--run-dir", str(run_dir))
    wait_for_line(process, "⚡ [PARALLEL] Agent 8")
    (hub,) = hub_processes() - hubs_before
    os.kill(hub, signal.SIGKILL)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 1
    assert errors.strip().splitlines() == [
        "error: the run's hub actor died (it supervises the agents and reports their progress); "
        f"the agents that finished are saved in {run_dir}; resume with: metaagent resume {run_dir}"
    ]
    record = load(run_dir)
    assert record.status == "failed" and (run_dir / "final.md").is_file()
    assert [agent.status for agent in record.agents] == ["ok"] * 8 + ["pending"]


# --- item 5: stop signals ------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_end_the_run_interrupted_with_the_resume_command(ray_cluster, tmp_path: Path, latency_file, signum, code):
    run_dir = tmp_path / "run"
    latency = latency_file({"default": 0.1, "1": 60.0})
    process = start("exec", str(PLAN), "--llm", "fake", "--fake-latency", latency, "--address", ray_cluster.address, "--run-dir", str(run_dir))
    wait_for_line(process, "Agent 0 completed")
    process.send_signal(signum)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == code
    assert errors.strip().splitlines() == [
        f"error: interrupted; the agents that finished are saved in {run_dir}; resume with: metaagent resume {run_dir}"
    ]
    record = load(run_dir)
    assert record.status == "interrupted" and record.agents[0].status == "ok" and (run_dir / "final.md").is_file()


def test_repeated_ctrl_c_on_an_embedded_run_is_clean_and_leaves_no_ray_process(tmp_path: Path, latency_file):
    """Ctrl-C in a terminal signals the whole foreground process group, three times here."""
    run_dir = tmp_path / "run"
    latency = latency_file({"default": 0.1, "1": 60.0})
    process = start("exec", str(PLAN), "--llm", "fake", "--fake-latency", latency, "--run-dir", str(run_dir), session=True)
    wait_for_line(process, "Agent 0 completed")
    ray_processes = descendants(process.pid)
    assert any("raylet" in " ".join(child.cmdline()) for child in ray_processes)
    for _ in range(3):
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(0.2)
    output, errors = process.communicate(timeout=90)
    assert process.returncode == 130, errors
    assert "Traceback" not in output + errors
    assert errors.strip().splitlines()[-1].startswith("error: interrupted; the agents that finished are saved")
    assert load(run_dir).status == "interrupted"
    alive = [child for child in ray_processes if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [child.cmdline() for child in alive]


def test_ctrl_c_while_the_streamed_coordinator_writes_is_one_line_and_leaves_no_ray_process(tmp_path: Path, latency_file):
    """Agents already started from the half-written plan are cancelled with it; there is no plan to resume."""
    run_dir = tmp_path / "run"
    latency = latency_file({"default": 60.0, "coordinator": 20.0})  # the plan streams over 20 s, each agent takes a minute
    query = "Compare Python, Rust, and Go for web development"
    process = start("run", query, "--llm", "fake", "--fake-latency", latency, "--run-dir", str(run_dir), session=True)
    wait_for_line(process, "Agent 0: RESEARCHER")  # started while the plan is still being written
    ray_processes = descendants(process.pid)
    os.killpg(process.pid, signal.SIGINT)
    output, errors = process.communicate(timeout=60)  # the rest of the plan and then agent 0 take minutes: only cancelling ends it sooner
    assert process.returncode == 130
    assert "Traceback" not in output + errors
    assert errors.strip().splitlines() == ["error: interrupted while the coordinator planned; nothing was saved (no plan yet)"]
    assert not (run_dir / "record.json").exists()
    alive = [child for child in ray_processes if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [child.cmdline() for child in alive]


# --- item 6: embedded Ray listens on loopback only -----------------------------------------------


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is IPv4's loopback on a dual-stack socket
    return (mapped or address).is_loopback


def test_embedded_ray_listens_on_loopback_only(tmp_path: Path, latency_file):
    latency = latency_file({"default": 0.1, "3": 60.0})
    process = start("exec", str(PLAN), "--llm", "fake", "--fake-latency", latency, "--run-dir", str(tmp_path / "run"), session=True)
    try:
        wait_for_line(process, "Agent 6")  # agent 3 still runs: the run is in full flight
        pids = {process.pid, *(child.pid for child in descendants(process.pid))}
        listening = [
            connection
            for connection in psutil.net_connections(kind="inet")
            if connection.pid in pids and connection.status == psutil.CONN_LISTEN
        ]
        assert listening
        exposed = [(connection.pid, connection.laddr) for connection in listening if not is_loopback(connection.laddr.ip)]
        assert not exposed
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.communicate(timeout=90)


# --- item 7: bad input is one line and exit 2, before anything runs ------------------------------


def one_line_exit_2(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output


def test_a_binary_record_is_one_line_for_resume_and_viz(tmp_path: Path):
    (tmp_path / "record.json").write_bytes(bytes(range(256)))
    for command in ("resume", "viz"):
        one_line_exit_2(CliRunner().invoke(app, [command, str(tmp_path)]), "not a valid run record (not UTF-8 text)")


@pytest.mark.usefixtures("ray_session")
def test_a_record_whose_agent_ids_do_not_match_their_positions_is_one_line(tmp_path: Path):
    run_dir = tmp_path / "run"
    assert CliRunner().invoke(app, ["exec", str(PLAN), "--llm", "fake", "--run-dir", str(run_dir)]).exit_code == 0
    data = json.loads((run_dir / "record.json").read_text())
    data["agents"][3]["id"] = 7
    (run_dir / "record.json").write_text(json.dumps(data))
    for command in ("resume", "viz"):
        one_line_exit_2(CliRunner().invoke(app, [command, str(run_dir)]), "agents[3] has id 7, which does not match its position")


def test_bad_output_paths_are_refused_before_anything_runs(tmp_path: Path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["exec", str(PLAN), "--run-dir", str(a_file)], f"--run-dir {a_file}: a file is in the way"),
        (["exec", str(PLAN), "--record", str(tmp_path)], f"--record {tmp_path}: is a directory"),
        (["run", "Compare A and B", "--record", str(a_file / "r.json")], f"--record {a_file / 'r.json'}: {a_file} is a file, not a directory"),
        (["plan", "Compare A and B", "-o", str(a_file / "sub" / "plan.json")], f"{a_file} is a file, not a directory"),
        (["run", "Compare A and B", "--ray-timeline", str(tmp_path)], f"--ray-timeline {tmp_path}: is a directory"),
    ]
    for args, expected in cases:
        result = CliRunner().invoke(app, [*args, "--llm", "fake"])
        one_line_exit_2(result, expected)
        assert "Coordinator" not in result.output
    assert not (Path.cwd() / "runs").exists() or not any((Path.cwd() / "runs").glob("*compare-a-and-b*"))


# --- item 8: the figures are right ---------------------------------------------------------------


@pytest.mark.usefixtures("ray_session")
def test_attempts_count_every_execution_when_ray_retries_run_out(latency_file):
    latency = latency_file({"default": 0.0, "1": 30.0})

    def kill_agent_1(event: object) -> None:
        if isinstance(event, AgentStarted) and str(event.path) == "1" and event.pid:
            os.kill(event.pid, signal.SIGKILL)

    record = MetaAgent(llm="fake", llm_options={"latency": latency}, on_event=kill_agent_1).execute(json.loads(PLAN.read_text()), "q", save=False)
    assert record.agents[1].status == "failed" and record.agents[1].attempts == 4  # the first execution and Ray's 3 retries


@pytest.mark.usefixtures("ray_session")
def test_the_summary_time_covers_this_runs_own_agents(tmp_path: Path, latency_file):
    timed_out = CliRunner().invoke(app, ["exec", str(PLAN), "--llm", "fake", "--fake-fail", "3:hang", "--agent-timeout", "1", "--retries", "0",
                                          "--run-dir", str(tmp_path / "hang")])
    record = load(tmp_path / "hang")
    hung, dependent = record.agents[3], record.agents[7]
    assert hung.status == "failed" and "no answer within 1 s" in (hung.error or "")
    assert hung.started_at is not None and hung.finished_at is not None and dependent.started_at is not None
    assert hung.started_at < hung.finished_at <= dependent.started_at  # its time ends when it was given up, before 7 ran without it
    assert record.makespan() == max(agent.finished_at for agent in record.agents) - min(agent.started_at for agent in record.agents)  # type: ignore[type-var]
    assert f"in {record.makespan():.1f} s" in timed_out.output

    run_dir = tmp_path / "run"
    CliRunner().invoke(app, ["exec", str(PLAN), "--llm", "fake", "--fake-fail", "8", "--run-dir", str(run_dir)])
    data = json.loads((run_dir / "record.json").read_text())
    for agent in data["agents"]:  # an old run: its agents finished long ago
        agent["started_at"], agent["finished_at"] = (agent["started_at"] or 0) - 1000, (agent["finished_at"] or 0) - 1000
    (run_dir / "record.json").write_text(json.dumps(data))
    resumed = CliRunner().invoke(app, ["resume", str(run_dir), "--llm", "fake", "--fake-latency", "0.2"])
    assert "re-running agents [8], reusing [0, 1, 2, 3, 4, 5, 6, 7]" in resumed.output
    summary = next(line for line in resumed.output.splitlines() if line.startswith("🏁"))
    after = load(run_dir)
    rerun = after.agents[8]
    assert after.makespan() == rerun.finished_at - rerun.started_at  # type: ignore[operator]  # the reused agents, 1000 s older, do not count
    assert summary == f"🏁 9/9 agents ok in {after.makespan():.1f} s (8 reused from the earlier run)", summary


# --- item 9: one writer per run directory --------------------------------------------------------


def test_a_second_resume_of_a_run_being_resumed_is_refused(ray_cluster, tmp_path: Path, latency_file):
    run_dir = tmp_path / "run"
    CliRunner().invoke(app, ["exec", str(PLAN), "--llm", "fake", "--fake-fail", "8", "--run-dir", str(run_dir), "--address", ray_cluster.address])
    latency = latency_file({"default": 30.0})
    first = start("resume", str(run_dir), "--llm", "fake", "--fake-latency", latency, "--address", ray_cluster.address)
    try:
        wait_for_line(first, "⚡ [PARALLEL] Agent 8")
        second = CliRunner().invoke(app, ["resume", str(run_dir), "--llm", "fake"])
        one_line_exit_2(second, f"{run_dir}: another run or resume is writing this directory now")
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    assert load(run_dir).status == "interrupted"
