"""Files replaced whole (metaagent_ray/files.py): a reader sees the old file or the new one, never half
of either, and no temporary is left behind, whatever happens while it is written."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from metaagent_ray.files import replacing, write_atomic


def test_a_reader_sees_the_old_file_or_the_new_one_never_half(tmp_path: Path):
    path = tmp_path / "record.json"
    versions = ["a" * 200_000, "b" * 300_000]
    whole = {version.encode() for version in versions}
    write_atomic(path, versions[0])
    done = threading.Event()
    reads: list[bool] = []

    def read() -> None:
        while not done.is_set():
            reads.append(path.read_bytes() in whole)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for turn in range(200):
            write_atomic(path, versions[turn % 2])
    finally:
        done.set()
        reader.join()
    assert reads and all(reads)
    assert path.read_text(encoding="utf-8") == versions[1]
    assert [entry.name for entry in tmp_path.iterdir()] == ["record.json"]


def test_a_written_file_is_readable_by_others_and_writable_by_no_one_else_whatever_the_umask(tmp_path: Path):
    earlier = os.umask(0)  # the most permissive umask a user can have
    try:
        write_atomic(tmp_path / "final.md", "done\n")
    finally:
        os.umask(earlier)
    assert stat.S_IMODE((tmp_path / "final.md").stat().st_mode) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path):
    path = tmp_path / "model.gguf"
    path.write_text("old")
    with pytest.raises(RuntimeError), replacing(path) as partial:
        partial.write_text("half a mod")
        raise RuntimeError("the writer died")
    assert path.read_text() == "old"
    assert [entry.name for entry in tmp_path.iterdir()] == ["model.gguf"]


def test_a_block_that_writes_nothing_replaces_nothing(tmp_path: Path):
    with replacing(tmp_path / "state.bin") as partial:
        assert not partial.exists() and partial.parent == tmp_path  # another program may be asked to write it by name
    assert list(tmp_path.iterdir()) == []


def test_another_program_writing_the_temporary_by_name_replaces_the_file(tmp_path: Path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"old")
    with replacing(path) as partial:
        fd = os.open(tmp_path / partial.name, os.O_WRONLY | os.O_CREAT, 0o600)  # as llama.cpp's server saves a slot
        os.write(fd, b"new")
        os.close(fd)
    assert path.read_bytes() == b"new"
    assert [entry.name for entry in tmp_path.iterdir()] == ["state.bin"]
