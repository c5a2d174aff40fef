"""LLM backends behind one protocol, chosen by name through a registry.

Backends register a factory under a name; modules are imported only when their backend is used,
so an optional dependency (xllamacpp) costs nothing to those who do not use it.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Callable

from ..errors import ConfigError
from .base import LLM, LLMConfig, LLMError, LLMRequest, LLMResponse, LLMUnavailable, Message, PromptStyle, TextCallback

__all__ = [
    "LLM",
    "LLMConfig",
    "LLMError",
    "LLMRequest",
    "LLMResponse",
    "LLMUnavailable",
    "Message",
    "PromptStyle",
    "TextCallback",
    "available_backends",
    "create_llm",
    "get_llm",
    "register_backend",
]

BackendFactory = Callable[[LLMConfig], LLM]

# name -> "module:factory", imported on first use
_BACKEND_PATHS: dict[str, str] = {
    "fake": "metaagent_ray.llm.fake:create",
    "ollama": "metaagent_ray.llm.ollama:create",
    "local": "metaagent_ray.local_server:create",
    "openai": "metaagent_ray.llm.openai:create",
    "pooled": "metaagent_ray.pool:create_backend",
}
_FACTORIES: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory | str) -> None:
    """Make a backend available under `name` (a factory, or a "module:function" path)."""
    if isinstance(factory, str):
        _BACKEND_PATHS[name] = factory
        _FACTORIES.pop(name, None)
    else:
        _FACTORIES[name] = factory


def available_backends() -> list[str]:
    return sorted({*_BACKEND_PATHS, *_FACTORIES})


def _factory(name: str) -> BackendFactory:
    if name not in _FACTORIES:
        if name not in _BACKEND_PATHS:
            raise ConfigError(f"unknown LLM backend {name!r} (backends: {', '.join(available_backends())})")
        module_name, function_name = _BACKEND_PATHS[name].split(":")
        _FACTORIES[name] = getattr(importlib.import_module(module_name), function_name)
    return _FACTORIES[name]


def create_llm(config: LLMConfig) -> LLM:
    """A new backend instance; raises ConfigError for an unknown name or bad options."""
    return _factory(config.backend)(config)


@lru_cache(maxsize=8)
def _cached(key: str) -> LLM:
    return create_llm(LLMConfig.model_validate_json(key))


def get_llm(config: LLMConfig) -> LLM:
    """The backend for this config, created once per process (a Ray worker loads a model once)."""
    return _cached(config.cache_key())
