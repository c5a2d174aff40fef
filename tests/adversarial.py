"""What the adversarial suite (tests/test_adversarial_*.py) shares: the outcome a user must get from
bad input, plans to run, and small file systems of their own (read-only, full) for run directories."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import Result
from typer.testing import CliRunner

from metaagent_ray.cli import app

# two researchers, then a synthesizer that joins them: small enough to run in a fraction of a second
TWO_AND_JOIN: dict[str, Any] = {
    "description": "two researchers and a synthesizer",
    "agents": [
        {"role": "RESEARCHER", "task": "Research the first aspect", "depends_on": []},
        {"role": "RESEARCHER", "task": "Research the second aspect", "depends_on": []},
        {"role": "SYNTHESIZER", "task": "Write the final answer", "depends_on": [0, 1]},
    ],
}


def write_plan(path: Path, plan: object = TWO_AND_JOIN) -> Path:
    path.write_text(plan if isinstance(plan, str) else json.dumps(plan), encoding="utf-8")
    return path


def invoke(*args: str) -> Result:
    """`metaagent ARGS` in this process (the session's Ray, when a test asks for it, is the run's)."""
    return CliRunner().invoke(app, list(args))


def error_line(output: str, code: int, exit_code: int, *expected: str) -> str:
    """The outcome promised for bad input: exit `code`, no traceback, exactly one `error:` line holding `expected`."""
    assert exit_code == code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def only_line(result: Result, code: int, *expected: str) -> str:
    """Refused before anything ran: the error line is all the output."""
    line = error_line(result.output, code, result.exit_code, *expected)
    assert result.output.strip().splitlines() == [line], result.output
    return line


# --- file systems of their own ------------------------------------------------------------------


def _mount(*args: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root and mount(8)")
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` until the block ends: a file system whose space runs out."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def make_read_only(path: Path) -> None:
    """Remount the tmpfs at `path` read-only: root cannot write it either (unlike chmod)."""
    _mount("-o", "remount,ro", str(path))


def fill(path: Path) -> None:
    """Write zeros into `path` until its file system says it is full (ENOSPC)."""
    with open(path / "filler", "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
