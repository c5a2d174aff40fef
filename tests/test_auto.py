"""`--llm auto`: Ollama when it serves the model, else the embedded backend, else one clear line."""

from __future__ import annotations

import pytest

from metaagent_ray.llm import LLMConfig, LLMUnavailable
from metaagent_ray.llm.auto import resolve_auto
from metaagent_ray.llm.local import local_backend_available
from tests.ollama_server import allow_model_requests_to

NOBODY = "http://127.0.0.1:9"  # the discard port: nothing answers there


def test_auto_prefers_an_ollama_server_that_has_the_model(ollama_server):
    config, why = resolve_auto(LLMConfig(backend="auto", options={"host": ollama_server.url}))
    assert config.backend == "ollama" and config.model == "llama3.2:1b"
    assert why == f"an Ollama server at {ollama_server.url} has llama3.2:1b"


def test_auto_skips_a_server_without_the_model(ollama_server):
    if not local_backend_available():
        pytest.skip("the local extra is not installed")
    config, why = resolve_auto(LLMConfig(backend="auto", model="missing:1b", options={"host": ollama_server.url}))
    assert config.backend == "local"
    assert why.startswith(f"no Ollama server with missing:1b at {ollama_server.url}")


def test_auto_without_ollama_uses_the_local_backend_or_says_how_to_get_one():
    allow_model_requests_to(NOBODY)
    if local_backend_available():
        config, why = resolve_auto(LLMConfig(backend="auto", options={"host": NOBODY}))
        assert config.backend == "local" and config.options == {}
        assert "embedded llama.cpp backend is installed" in why
    else:
        with pytest.raises(LLMUnavailable, match="`ollama serve`.*pip install 'metaagent-ray\\[local\\]'"):
            resolve_auto(LLMConfig(backend="auto", options={"host": NOBODY}))
