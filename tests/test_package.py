"""What users install is the wheel: every file the package reads at run time must be inside it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "metaagent_ray"


def source_files() -> set[str]:
    """Every file of the package in the source tree, as a wheel names it (compiled caches aside)."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (built,) = out.glob("metaagent_ray-*.whl")
    return built


def test_the_wheel_holds_every_file_of_the_package(wheel: Path) -> None:
    inside = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(source_files() - inside)
    assert not missing, f"files the package has but the wheel lacks: {missing}"
    assert any(name.startswith("metaagent_ray/prompts/coordinator_example/") for name in inside)


def test_the_wheel_registers_the_command_and_the_backends(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    (entry_points,) = [name for name in archive.namelist() if name.endswith(".dist-info/entry_points.txt")]
    text = archive.read(entry_points).decode()
    assert "metaagent = metaagent_ray.__main__:main" in text
    for backend in ("fake", "local", "ollama", "openai"):
        assert f"{backend} = " in text
