"""Submitting a run to a Ray cluster as a Ray Job, following its log, and bringing its run directory back.

The job's driver is `metaagent exec|run ... --ship-run-dir` on the cluster; Ray sets RAY_ADDRESS in
it, so the agents run on the cluster's nodes and slots. The run directory travels back through the
job's own log: when the run ends, the driver prints it as a gzipped tar in base64 between two
marker lines, and `follow_job` unpacks it under runs/ on the submitting machine. Chosen over a
`--storage` URI (pyarrow.fs, as Ray Train's storage_path) because it needs nothing beyond the job
API the submission already uses: no shared filesystem, bucket or credentials on either side, and
`--attach` can fetch it again as long as the cluster keeps the job's log. A run directory is small
(records, outputs and SVG pictures: tens of KB for dozens of agents); one over SHIP_LIMIT_BYTES
stays on the cluster and the log says where.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shlex
import shutil
import sys
import tarfile
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

from .connect import check_port, token_advice
from .errors import ConfigError
from .record import RunRecord
from .run_directory import RunDirectory, run_dir_name

ARCHIVE_BEGIN = "=== metaagent run directory: tar.gz, base64 ==="
ARCHIVE_END = "=== end of metaagent run directory ==="
ARCHIVE_LINE = 4096  # base64 characters per log line
SHIP_LIMIT_BYTES = 64 * 1024 * 1024
PLAN_IN_JOB = "plan.json"  # where a submitted plan file lies in the job's working directory


@dataclass(frozen=True)
class JobRequest:
    """One run to submit: `command` is metaagent's argv after `metaagent` (exec PLAN or run QUERY, and its options)."""

    address: str  # the head's dashboard, http://HEAD:8265
    command: list[str]
    working_dir: Path | None = None
    pip: list[str] = field(default_factory=list)
    env_vars: dict[str, str] = field(default_factory=dict)

    def runtime_env(self, working_dir: Path) -> dict[str, object]:
        env: dict[str, object] = {"working_dir": str(working_dir)}
        if self.pip:
            env["pip"] = list(self.pip)
        if self.env_vars:
            env["env_vars"] = dict(self.env_vars)
        return env


def dashboard_address(given: str | None) -> str:
    """The head's dashboard to submit to: `given`, else $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS."""
    address = given or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("submit needs the head's dashboard: --address http://HEAD:8265 (or RAY_ADDRESS)")
    return address


def job_run_dir(slug_source: str) -> Path:
    """The run directory of a run inside a submitted job: a directory of its own outside the job's working
    directory (Ray may unpack the working directory again while the job runs: a run kept there lost its runs/)."""
    return Path(tempfile.mkdtemp(prefix="metaagent-job-")) / run_dir_name(slug_source)


def job_client(address: str) -> JobSubmissionClient:
    """A client of the head's job API, after a bounded check that it is there; one line when it is not."""
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"--address {address!r}: metaagent submit takes the head's dashboard URL, http://HEAD:8265 (also read from RAY_ADDRESS)"
        )
    check_port(address, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), "`ray start --head` with the dashboard on")
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise ConfigError(token_advice(address)) from None
    except (ConnectionError, RuntimeError) as error:
        raise ConfigError(f"no Ray job API at {address}: {next(iter(str(error).splitlines()), '')}") from None


def submit_job(request: JobRequest, *, plan_file: Path | None = None) -> str:
    """Submit the run as a Ray Job and return its id.

    A plan file travels in the job's working directory: inside `--working-dir` if given (it must lie
    there), else in a directory of its own, which also gives the job a clean place for runs/.
    """
    command = list(request.command)
    with tempfile.TemporaryDirectory(prefix="metaagent-job-") as scratch:
        working_dir = request.working_dir
        if working_dir is None:
            working_dir = Path(scratch)
            # Ray names a working_dir package by its contents and shares its unpacked copy among jobs:
            # two submissions of one plan at once lost their plan.json that way. A package of its own:
            (working_dir / ".metaagent-submission").write_text(uuid.uuid4().hex)
            if plan_file is not None:
                shutil.copyfile(plan_file, working_dir / PLAN_IN_JOB)
                command = [PLAN_IN_JOB if part == str(plan_file) else part for part in command]
        elif plan_file is not None:
            try:
                inside = plan_file.resolve().relative_to(working_dir.resolve())
            except ValueError:
                raise ConfigError(
                    f"{plan_file}: the plan must lie inside --working-dir {working_dir}, which is what the job receives"
                ) from None
            command = [inside.as_posix() if part == str(plan_file) else part for part in command]
        if not working_dir.is_dir():
            raise ConfigError(f"--working-dir {working_dir}: not a directory")
        client = job_client(request.address)
        entrypoint = shlex.join(["metaagent", *command, "--ship-run-dir"])
        try:
            return client.submit_job(
                entrypoint=entrypoint, runtime_env=request.runtime_env(working_dir), metadata={"metaagent": command[0]}
            )
        except AuthenticationError:
            raise ConfigError(token_advice(request.address)) from None
        except RuntimeError as error:
            raise ConfigError(f"the job API at {request.address} refused the job: {next(iter(str(error).splitlines()), '')}") from None


@dataclass
class JobLog:
    """A job's log as it arrives: lines for the user, the run directory's archive kept aside."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    seen: int = 0  # characters of the log already handled (a re-attached tail starts from the beginning)
    archive: list[str] = field(default_factory=list)
    complete: bool = False
    _partial: str = ""
    _in_archive: bool = False

    def feed(self, text: str) -> None:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._line(line)

    def _line(self, line: str) -> None:
        if line == ARCHIVE_BEGIN:
            self._in_archive, self.archive, self.complete = True, [], False
        elif line == ARCHIVE_END and self._in_archive:
            self._in_archive, self.complete = False, True
        elif self._in_archive:
            self.archive.append(line)
        else:
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""


@dataclass(frozen=True)
class JobOutcome:
    """How a followed job ended and where its run directory was brought back (None if it was not)."""

    job_id: str
    status: JobStatus
    message: str
    run_dir: Path | None

    @property
    def exit_code(self) -> int:
        """The command's exit code, as the job's: 0 succeeded, 130 stopped (as by Ctrl-C), else 1."""
        return {JobStatus.SUCCEEDED: 0, JobStatus.STOPPED: 130}.get(self.status, 1)

    def failure(self) -> str:
        """One line for a job that did not succeed: its status and the first line of Ray's reason
        (Ray appends the log's tail to it, which was printed already)."""
        reason = next(iter(self.message.splitlines()), "")
        return f"job {self.job_id} {self.status.value.lower()}" + (f": {reason}" if reason else "")


def follow_job(address: str, job_id: str, log: JobLog, *, destination: Path | None = None) -> JobOutcome:
    """Print the job's log as it is written until the job ends, then bring its run directory back.

    KeyboardInterrupt propagates; calling again with the same `log` resumes where it stopped.
    """
    client = job_client(address)
    asyncio.run(_tail_from(client, job_id, log))
    log.close()
    info = client.get_job_info(job_id)
    run_dir = unpack_run_dir(log.archive, destination) if log.complete else None
    return JobOutcome(job_id=job_id, status=JobStatus(info.status), message=info.message or "", run_dir=run_dir)


async def _tail_from(client: JobSubmissionClient, job_id: str, log: JobLog) -> None:
    """Feed the log past what `log` has seen already (Ray's tail always starts at the beginning)."""
    position = 0
    async for chunk in client.tail_job_logs(job_id):
        start = max(0, log.seen - position)
        position += len(chunk)
        if start < len(chunk):
            log.feed(chunk[start:])
            log.seen = position


def stop_job(address: str, job_id: str) -> None:
    job_client(address).stop_job(job_id)


def print_run_archive(run_dir: Path, out: TextIO) -> None:
    """The job's side: print `run_dir` between the marker lines, for `follow_job` to unpack."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(run_dir, arcname=run_dir.name)
    data = buffer.getvalue()
    if len(data) > SHIP_LIMIT_BYTES:
        print(f"the run directory is {len(data) // 2**20} MiB, too big to send through the job's log; it stays in {run_dir}", file=out)
        return
    text = base64.b64encode(data).decode("ascii")
    print(ARCHIVE_BEGIN, file=out)
    for start in range(0, len(text), ARCHIVE_LINE):
        print(text[start : start + ARCHIVE_LINE], file=out)
    print(ARCHIVE_END, file=out, flush=True)


def unpack_run_dir(lines: list[str], destination: Path | None) -> Path:
    """Unpack a shipped run directory into `destination` (default runs/<its name>); its record says where it now is."""
    data = base64.b64decode("".join(lines))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        name = archive.getnames()[0].split("/")[0]
        target = destination or Path("runs") / name
        if target.exists() and any(target.iterdir()):
            raise ConfigError(f"{target} exists and is not empty; the job's run directory was not brought back (use --run-dir)")
        with tempfile.TemporaryDirectory(dir=target.parent if target.parent.exists() else None) as scratch:
            archive.extractall(scratch, filter="data")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(Path(scratch) / name), target)
    record_file = target / "record.json"
    if record_file.exists():
        record = RunRecord.model_validate_json(record_file.read_text(encoding="utf-8"))
        RunDirectory(target).write_record(record.model_copy(update={"run_dir": str(target)}))
    return target
