"""Adversarial run directories: read-only and full file systems, concurrent resumes, broken or
hand-edited records, and paths with spaces, unicode and newlines. Each gets one line saying what to
do and a non-zero exit (before Ray starts, where it can be known then), or works."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metaagent_ray.record import RunRecord
from tests.adversarial import error_line, fill, invoke, make_read_only, only_line, tmpfs, write_plan
from tests.ollama_server import last_user_message
from tests.stand_in_server import StandInServer, answer
from tests.test_run_endings import load, start, wait_for_line


@pytest.fixture
def plan(tmp_path: Path) -> Path:
    return write_plan(tmp_path / "plan.json")


def failed_run(run_dir: Path, plan: Path) -> None:
    """A run whose agent 1 failed (and so its dependent was run without it): a run to resume."""
    result = invoke("exec", str(plan), "--llm", "fake", "--fake-fail", "1", "--run-dir", str(run_dir))
    assert result.exit_code == 1, result.output


def resume_hint(output: str) -> list[str]:
    """The resume command the run printed, split as a shell would split it."""
    hint = shlex.shlex(output.split("To re-run what did not finish: ", 1)[1], posix=True, punctuation_chars=False)
    hint.whitespace_split = True
    return [next(hint), next(hint), next(hint)]


# --- read-only and full file systems ------------------------------------------------------------


def test_a_read_only_run_dir_is_one_line_saying_where_to_write_before_anything_runs(tmp_path: Path, plan: Path):
    with tmpfs(tmp_path / "ro") as mounted:
        make_read_only(mounted)
        result = invoke("exec", str(plan), "--llm", "fake", "--run-dir", str(mounted / "run"))
    only_line(result, 2, f"cannot write the run directory {mounted / 'run'}: read-only file system; pass --run-dir to a writable place")


def test_a_read_only_runs_in_the_working_directory_is_found_before_ray_starts(tmp_path: Path, plan: Path):
    with tmpfs(tmp_path / "runs") as runs:
        make_read_only(runs)
        done = subprocess.run([sys.executable, "-m", "metaagent_ray", "exec", str(plan), "--llm", "fake"],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""  # Ray never started: it would have said so on stdout
    assert done.stderr.strip().splitlines() == [
        "error: cannot write the run directory runs: read-only file system; pass --run-dir to a writable place"
    ]


def test_a_full_file_system_is_one_line_before_anything_runs(tmp_path: Path, plan: Path):
    with tmpfs(tmp_path / "full", size="1m") as mounted:
        fill(mounted)
        result = invoke("exec", str(plan), "--llm", "fake", "--run-dir", str(mounted / "run"))
    only_line(result, 2, "no space left on device; free some space there, or pass --run-dir to another file system")


@pytest.mark.usefixtures("ray_session")
def test_a_file_system_that_fills_during_a_run_ends_it_with_one_line_and_resume_finishes_once_there_is_room(tmp_path: Path, plan: Path):
    long_answer = "A long answer: " + " ".join(f"word{index}" for index in range(180_000))  # 1.5 MB, more than the room left

    def responder(body: dict) -> str:
        return long_answer if "Your task in the plan:\nResearch the first aspect" in last_user_message(body) else answer(body)

    with tmpfs(tmp_path / "disk", size="16m") as disk, StandInServer(api="openai", responder=responder) as server:
        (disk / "ballast").write_bytes(b"\0" * 15 * 1024**2)
        run_dir = disk / "run"
        # a budget that lets the long answer through whole (by default the role's budget would cut it)
        backend = ["--llm", "openai", "--openai-base-url", server.base_url, "--model", "test-model", "--max-tokens", "200000"]
        result = invoke("exec", str(plan), *backend, "--run-dir", str(run_dir))
        error_line(result.output, 2, result.exit_code, f"cannot write the run directory {run_dir}: no space left on device; "
                   f"free some space there, then: metaagent resume {run_dir}")  # fmt: skip
        assert load(run_dir).status == "running"  # as the last write that fitted left it

        (disk / "ballast").unlink()
        resumed = invoke("resume", str(run_dir))
        assert resumed.exit_code == 0, resumed.output[-3000:]
        record = load(run_dir)
        assert record.status == "ok" and record.agents[0].output.startswith("A long answer")


def test_resume_viz_and_report_of_a_read_only_run_dir_are_one_line_each(tmp_path: Path, plan: Path, ray_session):
    with tmpfs(tmp_path / "disk") as disk:
        failed_run(disk / "run", plan)
        make_read_only(disk)
        for command in ("resume", "viz", "report"):
            result = invoke(command, str(disk / "run"))
            only_line(result, 2, f"cannot write the run directory {disk / 'run'}: read-only file system; "
                      "make it writable, or copy it to a writable place and use the copy")  # fmt: skip


def test_a_record_file_on_a_read_only_file_system_is_refused_before_the_run(tmp_path: Path, plan: Path):
    with tmpfs(tmp_path / "ro") as mounted:
        make_read_only(mounted)
        result = invoke("exec", str(plan), "--llm", "fake", "--record", str(mounted / "record.json"), "--run-dir", str(tmp_path / "run"))
    only_line(result, 2, f"--record {mounted / 'record.json'}: cannot write in {mounted} (read-only file system)")
    assert not (tmp_path / "run").exists()


# --- one writer -----------------------------------------------------------------------------------


def test_two_resumes_started_together_one_runs_and_the_other_is_refused(ray_cluster, tmp_path: Path, plan: Path, latency_file):
    run_dir = tmp_path / "run"
    failed_run(run_dir, plan)
    latency = latency_file({"default": 60.0})  # the winner holds the directory until it is stopped
    both = [start("resume", str(run_dir), "--llm", "fake", "--fake-latency", latency, "--address", ray_cluster.address) for _ in range(2)]
    try:
        refused = first_to_exit(both)
        _, errors = refused.communicate(timeout=30)
        assert refused.returncode == 2
        assert errors.strip().splitlines() == [f"error: {run_dir}: another run or resume is writing this directory now; wait until it ends"]
        winner = next(process for process in both if process is not refused)
        wait_for_line(winner, "⚡ [PARALLEL] Agent 1")
    finally:
        for process in both:
            if process.poll() is None:
                process.terminate()
                process.communicate(timeout=60)
    assert load(run_dir).status == "interrupted" and load(run_dir).agents[0].status == "ok"


def first_to_exit(processes: list[subprocess.Popen[str]], timeout: float = 60.0) -> subprocess.Popen[str]:
    """The process that ends first (the refused one ends at once; the winner runs on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                return process
        time.sleep(0.05)
    raise AssertionError("neither resume ended: the second was not refused")


# --- broken and hand-edited records ----------------------------------------------------------------


@pytest.mark.usefixtures("ray_session")
def test_a_truncated_record_is_one_line_for_resume_viz_and_report(tmp_path: Path, plan: Path):
    run_dir = tmp_path / "run"
    failed_run(run_dir, plan)
    text = (run_dir / "record.json").read_text()
    (run_dir / "record.json").write_text(text[: len(text) // 2])
    for command in ("resume", "viz", "report"):
        only_line(invoke(command, str(run_dir)), 2, f"{run_dir / 'record.json'}: not a valid run record (Invalid JSON: EOF while parsing")


def hand_edited_run(run_dir: Path, plan: Path, agent: int, key: str, value: str) -> None:
    """A failed run whose record.json a person then edited: one agent's `key` set to `value`."""
    failed_run(run_dir, plan)
    data = json.loads((run_dir / "record.json").read_text())
    data["agents"][agent][key] = value
    (run_dir / "record.json").write_text(json.dumps(data))


@pytest.mark.usefixtures("ray_session")
def test_a_hand_made_agent_status_is_one_line_naming_the_field(tmp_path: Path, plan: Path):
    run_dir = tmp_path / "run"
    hand_edited_run(run_dir, plan, 1, "status", "done")
    only_line(
        invoke("resume", str(run_dir)),
        2,
        "not a valid run record (agents[1].status: Input should be 'pending', 'ok', 'failed', 'skipped' or 'delegated'",
    )


@pytest.mark.usefixtures("ray_session")
def test_a_hand_edited_record_is_honoured_edited_outputs_reused_and_reset_agents_run_again(tmp_path: Path, plan: Path):
    run_dir = tmp_path / "run"
    hand_edited_run(run_dir, plan, 0, "output", "Edited by hand: <keep me>")
    result = invoke("resume", str(run_dir), "--llm", "fake")
    assert result.exit_code == 0, result.output
    assert "re-running agents [1, 2], reusing [0]" in result.output
    record = load(run_dir)
    assert record.status == "ok" and record.agents[0].output == "Edited by hand: <keep me>" and record.agents[2].inputs_from == [0, 1]


def test_a_record_that_is_a_fifo_is_refused_at_once_not_waited_on(tmp_path: Path):
    os.mkfifo(tmp_path / "record.json")
    done = subprocess.run([sys.executable, "-m", "metaagent_ray", "resume", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'record.json'}: not a valid run record (not a regular file (a device, FIFO or socket))"
    ]


def test_a_record_nested_deeply_is_one_line(tmp_path: Path):
    (tmp_path / "record.json").write_text('{"query": ' + "[" * 100_000 + "]" * 100_000 + "}")
    only_line(invoke("viz", str(tmp_path)), 2, f"{tmp_path / 'record.json'}: not a valid run record (")


# --- odd paths and queries --------------------------------------------------------------------------


@pytest.mark.usefixtures("ray_session")
def test_a_run_dir_named_with_spaces_quotes_unicode_and_a_newline_runs_and_the_resume_command_it_prints_resumes_it(
    tmp_path: Path, plan: Path
):
    run_dir = tmp_path / "my runs" / 'it\'s "quoted" $HOME ünï 日本 🚀\nsecond line'
    result = invoke("exec", str(plan), "--llm", "fake", "--fake-fail", "1", "--run-dir", str(run_dir))
    assert result.exit_code == 1, result.output
    command, subcommand, path = resume_hint(result.output)
    assert (command, subcommand, path) == ("metaagent", "resume", str(run_dir))
    resumed = invoke(subcommand, path, "--llm", "fake")
    assert resumed.exit_code == 0, resumed.output
    assert load(run_dir).status == "ok"


def test_a_query_of_raw_bytes_that_are_not_utf8_is_one_line_before_anything_runs(tmp_path: Path):
    done = subprocess.run([sys.executable.encode(), b"-m", b"metaagent_ray", b"run", b"Compare \xff and B", b"--llm", b"fake"],
                          capture_output=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2 and done.stdout == b""
    assert done.stderr.decode().strip().splitlines() == ["error: argument 2 is not UTF-8 text (byte 0xff at character 8): give it as UTF-8"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.usefixtures("ray_session")
def test_a_query_of_emoji_newlines_and_dot_dots_runs_in_a_safely_named_directory_under_runs(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    query = "🚀🚀\n\n../../etc/passwd and Compare X and Y"
    result = invoke("run", query, "--llm", "fake")
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.endswith("-etc-passwd-and-compare-x-and-y")
    assert RunRecord.model_validate_json((run_dir / "record.json").read_text(encoding="utf-8")).query == query
    assert sorted(path.name for path in tmp_path.iterdir()) == ["runs"]
