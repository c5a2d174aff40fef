"""LLM backends behind one protocol, found by name through the `metaagent_ray.backends` entry points.

Every backend, the built-in ones included, is an entry point of that group in its distribution's
metadata (pyproject.toml), naming a factory `create(config) -> LLM`. Entry points are read from the
installed distributions, so every process finds the same backends: the driver and each Ray worker.
The registry imports a backend's module when the backend is first created. `auto` is no backend
but a choice between two (llm/auto.py, which the API and resources.py import, and with it the
ollama module and the local package, less its Ray actor); the optional dependencies (xllamacpp, gguf) are imported only when a
model is loaded or its file read, so they cost nothing to those who do not use them.

A third-party backend is a distribution that declares, e.g. in its pyproject.toml:

    [project.entry-points."metaagent_ray.backends"]
    mine = "my_package.backend:create"

and is installed wherever the run's processes run (every node of a cluster).
"""

from __future__ import annotations

import threading
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points

from ..errors import ConfigError
from .base import (
    CALL_TIMEOUT_S,
    LLM,
    LLMConfig,
    LLMError,
    LLMRequest,
    LLMResponse,
    LLMUnavailable,
    Message,
    ModelFootprint,
    ModelRequestsForbidden,
    PromptStyle,
    TextCallback,
    Usage,
)

__all__ = [
    "BACKEND_GROUP",
    "CALL_TIMEOUT_S",
    "LLM",
    "LLMConfig",
    "LLMError",
    "LLMRequest",
    "LLMResponse",
    "LLMUnavailable",
    "Message",
    "ModelFootprint",
    "ModelRequestsForbidden",
    "PromptStyle",
    "TextCallback",
    "Usage",
    "available_backends",
    "create_llm",
    "get_llm",
]

BACKEND_GROUP = "metaagent_ray.backends"


def _entry_points() -> dict[str, EntryPoint]:
    return {entry.name: entry for entry in entry_points(group=BACKEND_GROUP)}


def available_backends() -> list[str]:
    """The names of every installed backend."""
    return sorted(_entry_points())


def create_llm(config: LLMConfig) -> LLM:
    """A new backend instance; raises ConfigError for an unknown name or bad options."""
    entry = _entry_points().get(config.backend)
    if entry is None:
        raise ConfigError(
            f"unknown LLM backend {config.backend!r} (backends: {', '.join(available_backends())}; "
            f"a backend of your own is an entry point in the group {BACKEND_GROUP!r})"
        )
    return entry.load()(config)


@lru_cache(maxsize=8)
def _cached(key: str) -> LLM:
    return create_llm(LLMConfig.model_validate_json(key))


_creating = threading.Lock()  # an executor's first agents all ask at once: one of them creates it, the rest wait


def get_llm(config: LLMConfig) -> LLM:
    """The backend for this config, created once per process (a Ray worker loads a model once)."""
    with _creating:
        return _cached(config.cache_key())
