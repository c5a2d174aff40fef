"""Files replaced whole: whoever reads one (a person, another run, a process starting at the same
moment) sees the old file or the new one, never half of either.

The one way the project writes a file that others may read while it is written: the run directory's
files, the GGUF metadata cache, the assembled default model, saved prompt states.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator

FILE_MODE = 0o644  # readable by other users, as a file made under the usual umask is


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, not yet a file, for the block to write (itself, or by asking
    another program to). When the block ends without an error, what was written there replaces
    `path` in one step; `path` stays as it was if nothing was. No temporary outlives the block."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")
    try:
        yield temporary
        if temporary.exists():
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8, FILE_MODE whatever the umask) in one step."""
    with replacing(path) as temporary:
        # O_EXCL: a name planted beforehand (a link to elsewhere) is refused, never written through
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        os.fchmod(descriptor, FILE_MODE)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
