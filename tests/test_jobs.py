"""What `metaagent submit` sends and brings back, without a cluster: the job's command line and the
run directory's trip through the job's log."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from ray.job_submission import JobStatus
from typer.testing import CliRunner

from metaagent_ray import MetaAgent, load_plan
from metaagent_ray.api import load_record
from metaagent_ray.cli import RunOptions, _job_arguments, app
from metaagent_ray.jobs import JobLog, JobOutcome, JobRequest, print_run_archive, unpack_run_dir
from tests.conftest import EXAMPLES


def test_run_options_pass_to_the_job_except_where_the_run_goes_and_comes_back(tmp_path: Path):
    options = RunOptions(llm="fake", slots=3, fake_latency="0.5", verbose=True, address="http://head:8265", run_dir=tmp_path, record=tmp_path)
    assert _job_arguments(options) == ["--llm", "fake", "--slots", "3", "--fake-latency", "0.5", "--verbose"]


def test_a_run_directory_travels_through_a_log_split_anywhere(ray_session, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record = MetaAgent(llm="fake").execute(load_plan(EXAMPLES / "parallel_research.json"), run_dir=tmp_path / "on-cluster" / "run-1")
    log_text = io.StringIO()
    print("🏁 5/5 agents ok", file=log_text)
    print_run_archive(Path(record.run_dir), log_text)
    print("💾 Run saved", file=log_text)
    text, shown = log_text.getvalue(), io.StringIO()
    log = JobLog(out=shown)
    cuts = sorted(random.Random(7).sample(range(len(text)), 40))
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        log.feed(text[start:end])
    log.close()
    assert shown.getvalue() == "🏁 5/5 agents ok\n💾 Run saved\n"
    assert log.complete
    back = unpack_run_dir(log.archive, None)
    assert back == Path("runs") / "run-1"
    original = tmp_path / "on-cluster" / "run-1"
    assert sorted(path.relative_to(back).as_posix() for path in back.rglob("*")) == sorted(
        path.relative_to(original).as_posix() for path in original.rglob("*")
    )
    assert load_record(back).run_dir == "runs/run-1"  # the record says where it lies now


def test_the_runtime_env_carries_working_dir_pip_and_environment(tmp_path: Path):
    request = JobRequest(address="http://head:8265", command=["run", "q"], pip=["requests==2.32.3"], env_vars={"OLLAMA_HOST": "http://gpu:11434"})
    assert request.runtime_env(tmp_path) == {
        "working_dir": str(tmp_path),
        "pip": ["requests==2.32.3"],
        "env_vars": {"OLLAMA_HOST": "http://gpu:11434"},
    }
    assert JobRequest(address="http://head:8265", command=["run", "q"]).runtime_env(tmp_path) == {"working_dir": str(tmp_path)}


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["q"], "error: submit needs the head's dashboard: --address http://HEAD:8265 (or RAY_ADDRESS)"),
        (["q", "--plan", "p.json", "--address", "http://h:8265"], "error: submit takes a QUERY or --plan FILE (one of them)"),
        (["q", "--address", "10.0.0.5:6379"], "error: --address '10.0.0.5:6379': metaagent submit takes the head's dashboard URL, http://HEAD:8265 (also read from RAY_ADDRESS)"),
        (["q", "--address", "http://h:8265", "--env", "NOEQUALS"], "error: --env 'NOEQUALS': expected KEY=VALUE"),
        (["--attach", "raysubmit_1", "q", "--address", "http://h:8265"], "error: --attach follows a job already submitted; it takes no QUERY or --plan"),
    ],
)
def test_bad_submit_options_are_one_line(args: list[str], line: str, monkeypatch):
    for variable in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(variable, raising=False)
    result = CliRunner().invoke(app, ["submit", *args])
    assert result.exit_code == 2
    assert result.output.strip() == line


@pytest.mark.parametrize(
    ("status", "code", "line"),
    [
        (JobStatus.SUCCEEDED, 0, "job raysubmit_1 succeeded"),
        (JobStatus.STOPPED, 130, "job raysubmit_1 stopped: Job was intentionally stopped."),
        (JobStatus.FAILED, 1, "job raysubmit_1 failed: Job entrypoint command failed with exit code 1."),
    ],
)
def test_a_followed_job_ends_the_command_as_the_job_ended(status: JobStatus, code: int, line: str):
    message = {JobStatus.SUCCEEDED: "", JobStatus.STOPPED: "Job was intentionally stopped.",
               JobStatus.FAILED: "Job entrypoint command failed with exit code 1.\nlast lines of the log, printed already"}[status]  # fmt: skip
    outcome = JobOutcome(job_id="raysubmit_1", status=status, message=message, run_dir=None)
    assert outcome.exit_code == code
    assert outcome.failure() == line
