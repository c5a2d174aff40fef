"""Prompts are data: Markdown files beside this module, read by name. Changing one never touches code."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def load_prompt(name: str) -> str:
    """The text of `prompts/<name>.md` (e.g. "coordinator", "roles/researcher")."""
    return resources.files(__package__).joinpath(f"{name}.md").read_text(encoding="utf-8").strip()
