"""The key-value metadata at the head of a GGUF model file, read without loading the model.

The local backend needs two facts before any model is loaded: whether the file carries a chat
template (which prompt to build) and its attention shape (what one token of context cache costs,
for sizing slots in resources.py).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, BinaryIO, Iterator

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # struct codes
_STRING, _ARRAY = 8, 9


def _value(file: BinaryIO, kind: int) -> Any:
    """One metadata value; arrays of strings (the vocabulary) are skipped and read as None."""
    if kind in _SCALARS:
        code = _SCALARS[kind]
        return struct.unpack(f"<{code}", file.read(struct.calcsize(code)))[0]
    if kind == _STRING:
        (length,) = struct.unpack("<Q", file.read(8))
        return file.read(length).decode("utf-8", errors="replace")
    if kind == _ARRAY:
        item_kind, count = struct.unpack("<IQ", file.read(12))
        if item_kind in _SCALARS:
            code = f"{count}{_SCALARS[item_kind]}"
            return list(struct.unpack(f"<{code}", file.read(struct.calcsize(code))))
        if item_kind == _STRING:
            for _ in range(count):
                (length,) = struct.unpack("<Q", file.read(8))
                file.seek(length, os.SEEK_CUR)
            return None
        return [_value(file, item_kind) for _ in range(count)]
    raise ValueError(f"unknown GGUF value type {kind}")


def _items(file: BinaryIO) -> Iterator[tuple[str, Any]]:
    """The metadata (GGUF version 2 or 3), in file order."""
    magic, version, _tensors, count = struct.unpack("<4sIQQ", file.read(24))
    if magic != b"GGUF" or version < 2:
        raise ValueError("not a GGUF v2+ file")
    for _ in range(count):
        (length,) = struct.unpack("<Q", file.read(8))
        key = file.read(length).decode("utf-8", errors="replace")
        (kind,) = struct.unpack("<I", file.read(4))
        yield key, _value(file, kind)


def read_metadata(path: Path) -> dict[str, Any]:
    """The file's metadata; raises OSError, ValueError or struct.error for a file that is not GGUF."""
    with path.open("rb") as file:
        return dict(_items(file))
