"""`--llm auto`: a real model with zero set-up.

Ollama when a server answers and has the model; else the embedded llama.cpp backend when it is
installed; else one line on how to get either. The choice and its reason are reported to the user.
"""

from __future__ import annotations

from .base import LLMConfig, LLMUnavailable
from .local import INSTALL_HINT, local_backend_available
from .ollama import DEFAULT_MODEL, resolve_host, server_has_model


def resolve_auto(config: LLMConfig) -> tuple[LLMConfig, str]:
    """The concrete backend for an `auto` config, and why it was chosen."""
    host = resolve_host(config.options.get("host"))
    wants_gguf = (config.model or "").endswith(".gguf")
    ollama_model = config.model or DEFAULT_MODEL
    if not wants_gguf and server_has_model(host, ollama_model):
        return (
            LLMConfig(backend="ollama", model=ollama_model, options=config.options),
            f"an Ollama server at {host} has {ollama_model}",
        )
    if local_backend_available():
        why = "a .gguf model was given" if wants_gguf else f"no Ollama server with {ollama_model} at {host}"
        return LLMConfig(backend="local", model=config.model), f"{why}; the embedded llama.cpp backend is installed"
    raise LLMUnavailable(
        f"no LLM available: no Ollama server with {ollama_model} at {host} (`ollama serve`, then "
        f"`ollama pull {ollama_model}`), and no local backend ({INSTALL_HINT})"
    )
