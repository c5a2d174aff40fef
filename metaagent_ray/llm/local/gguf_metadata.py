"""The key-value metadata at the head of a GGUF model file, read with ggml's own reader (the `gguf`
package) without loading the model, and kept per file in a small cache.

The local backend needs two facts before any model is loaded: whether the file carries a chat
template (which prompt to build) and its attention shape (what one token of context cache costs,
for sizing slots). The `gguf` reader maps every field of the file, the whole vocabulary included:
for Gemma 3's 262,144 tokens that took 23-27 s on the loaded 2-core machine this was built on
(the hand-written parser it replaced: 0.12-0.19 s). So what callers need (scalars and short
arrays) is kept as JSON under the user's cache directory, keyed by the file's path, size and
modification time, and a file is read once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ...files import write_atomic
from ..base import user_cache_dir

CACHE_VERSION = 1
LONG_ARRAY = 1024  # arrays longer than this (vocabulary, scores, merges) are left out: no caller needs them


def _read(path: Path) -> dict[str, Any]:
    """Every scalar and short array of the file's metadata, through the `gguf` package's reader."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ValueError("the gguf package is not installed: pip install 'metaagent-ray[local]'") from None
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError) as error:  # what the reader raises for a file that is not GGUF
        raise ValueError(f"not a GGUF file ({type(error).__name__}: {error})") from None
    metadata: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and len(field.data) <= LONG_ARRAY:
            value = field.contents()
            metadata[name] = value.item() if hasattr(value, "item") else value
    return metadata


def read_metadata(path: Path) -> dict[str, Any]:
    """The file's metadata (scalars and arrays of up to LONG_ARRAY items); raises OSError or ValueError
    for a file that cannot be read or is not GGUF."""
    stat = path.stat()
    key = hashlib.sha256(f"{CACHE_VERSION}:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    cached = user_cache_dir("gguf-metadata") / f"{key}.json"
    try:
        return json.loads(cached.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    metadata = _read(path)
    try:  # written whole or not at all, so that processes reading at once never see half a file
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, json.dumps(metadata))
    except OSError:
        pass  # no writable cache: the file is read again next time
    return metadata
