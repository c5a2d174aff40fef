"""Saved prompt states: a request's shared leading messages read once per machine, not once per run.

The coordinator's instructions and worked examples (~1,270 tokens: 4.5 s of prompt reading on 2
cores) start every coordinator prompt. The client has the server read them into one slot
(PREFIX_SLOT) and save that slot's state (27 MiB) under the user's cache; later runs restore it in
15 ms (llama.cpp's slot save and restore). The newest files are kept: one per model, engine version
and prompt (the prompt names the run's agent limit).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Literal

import httpx

from ...files import replacing
from ..base import user_cache_dir

PREFIX_SLOT = 0
KEPT_PREFIX_FILES = 8


def prepare_prefix_cache() -> Path | None:
    """The directory of saved prompt states, the user's alone (0700), made if missing and trimmed to
    the newest files; None where it cannot be written (a read-only home): prompts are then read whole."""
    directory = user_cache_dir("prompt-states")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)  # the model reads these states back: no one else may read or replace them
        saved = sorted(directory.glob("*.bin"), key=lambda file: file.stat().st_mtime, reverse=True)
        for stale in saved[KEPT_PREFIX_FILES:]:
            stale.unlink(missing_ok=True)
    except OSError:
        return None
    return directory


async def hold_prefix(client: httpx.AsyncClient, cache: str, key: str, prefix: str) -> Literal["restored", "read"] | None:
    """Put the model's state after `prefix` into the prefix slot: "restored" from the node's saved
    states, or "read" now and saved for later runs; None if the server refused (the slot busy with
    another request, a state from another build), and the prompt is read in full, as without it."""
    name = hashlib.sha256(f"{key}\n{prefix}".encode()).hexdigest()[:32] + ".bin"
    directory = Path(cache)
    if (directory / name).is_file():
        restored = await client.post(f"/slots/{PREFIX_SLOT}?action=restore", json={"filename": name})
        return "restored" if restored.status_code == 200 else None
    read = await client.post("/v1/completions", json={"prompt": prefix, "max_tokens": 0, "id_slot": PREFIX_SLOT, "cache_prompt": True})
    if read.status_code != 200:
        return None
    with contextlib.suppress(OSError), replacing(directory / name) as partial:  # another run may restore it at any time
        saved = await client.post(f"/slots/{PREFIX_SLOT}?action=save", json={"filename": partial.name})
        if saved.status_code != 200:  # not saved: a later run reads the prompt again, nothing worse
            partial.unlink(missing_ok=True)
    return "read"
