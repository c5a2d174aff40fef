"""Every example under examples/ runs as its documentation says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metaagent_ray.cli import app
from metaagent_ray.llm.base import MODEL_REQUESTS_ENV
from metaagent_ray.record import RunRecord
from metaagent_ray.version import __version__
from tests.conftest import EXAMPLES


def run_python_api(*arguments: str) -> subprocess.CompletedProcess[str]:
    """`python examples/python_api.py ...` as a user types it: its own process, Ray started inside."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "python_api.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_ADDRESS": ""},
    )


def test_the_python_api_example_runs_on_the_fake_llm() -> None:
    result = run_python_api()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "planned layers:" in result.stdout
    assert "run ok in" in result.stdout
    assert "business plan: ok" in result.stdout


@pytest.mark.model
def test_the_python_api_example_runs_on_a_real_model() -> None:
    """`python examples/python_api.py auto`: Ollama if it serves the model, else the embedded llama.cpp."""
    pytest.importorskip("xllamacpp")
    assert os.environ.get(MODEL_REQUESTS_ENV) != "0"
    result = run_python_api("auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run ok in" in result.stdout and "business plan: ok" in result.stdout


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("plan_file", sorted(path.name for path in EXAMPLES.glob("*.json")))
def test_each_example_plan_runs_with_exec(plan_file: str, tmp_path: Path) -> None:
    """`metaagent exec examples/<plan>.json` (the README's form), on the fake LLM."""
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["exec", str(EXAMPLES / plan_file), "--llm", "fake", "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    record = RunRecord.model_validate_json((run_dir / "record.json").read_text())
    assert record.status == "ok" and record.final_output
    assert record.metaagent_version == __version__
    assert all(agent.status == "ok" for agent in record.agents)
