"""The Ollama backend through real HTTP: the official `ollama` client against the test server."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import pytest

from metaagent_ray.errors import ConfigError
from metaagent_ray.llm import LLMConfig, LLMError, LLMUnavailable, create_llm
from metaagent_ray.llm.bounds import TEMPLATE_MARKERS
from metaagent_ray.llm.ollama import DEFAULT_MODEL, OllamaLLM, server_has_model
from tests.conftest import agent_request, closed_port_url
from tests.ollama_server import DEFAULT_PLAN, OllamaServer, first_calls

PLAN_SCHEMA = {
    "type": "object",
    "properties": {"description": {"type": "string"}, "agents": {"type": "array"}},
    "required": ["agents"],
}


@pytest.fixture
def server() -> Iterator[OllamaServer]:
    with OllamaServer() as running:
        yield running


def backend(host: str, model: str | None = None, **options: object) -> OllamaLLM:
    llm = create_llm(LLMConfig(backend="ollama", model=model, options={"host": host, **options}))
    assert isinstance(llm, OllamaLLM)
    return llm


def test_schema_goes_as_format_and_every_call_names_the_model(server: OllamaServer) -> None:
    llm = backend(server.url, temperature=0.2)
    plan = llm.complete(agent_request(json_schema=PLAN_SCHEMA, max_tokens=512))
    answer = llm.complete(agent_request("Research A"))

    assert json.loads(plan.text) == DEFAULT_PLAN
    assert answer.text == "Answer to: Research A"
    with_schema, without_schema = server.chat_bodies()
    assert with_schema["format"] == PLAN_SCHEMA
    assert "format" not in without_schema
    assert with_schema["options"] == {"num_predict": 512, "stop": list(TEMPLATE_MARKERS), "temperature": 0.2}
    assert without_schema["options"] == {"stop": list(TEMPLATE_MARKERS), "temperature": 0.2}  # no budget given: the server's
    assert with_schema["messages"] == [
        {"role": "system", "content": "You are a RESEARCHER."},
        {"role": "user", "content": "Compare A and B"},
    ]
    assert all(body["model"] == DEFAULT_MODEL and body["stream"] is False for body in server.chat_bodies())


def test_tokens_and_time_come_from_the_server(server: OllamaServer) -> None:
    server.duration_ns = 1_234_500_000  # what the server says the call took, not what a clock here would measure
    response = backend(server.url).complete(agent_request("one two three"))

    assert response.prompt_tokens == len("You are a RESEARCHER. one two three".split())
    assert response.completion_tokens == len(response.text.split())
    assert response.llm_ms == 1234.5


def test_calls_from_many_threads_overlap(server: OllamaServer) -> None:
    server.hold = 3  # each call waits until three are in flight
    llm = backend(server.url)
    with ThreadPoolExecutor(max_workers=3) as pool:
        texts = list(pool.map(lambda topic: llm.complete(agent_request(topic)).text, ["A", "B", "C"]))

    assert texts == ["Answer to: A", "Answer to: B", "Answer to: C"]
    assert server.max_in_flight == 3
    assert server.wait_until_idle()


def test_server_error_is_transient(server: OllamaServer) -> None:
    server.fault = lambda body: "http_500"
    with pytest.raises(LLMError) as caught:
        backend(server.url).complete(agent_request())
    assert caught.value.transient
    assert "HTTP 500" in str(caught.value)


def test_a_fault_for_the_first_calls_only(server: OllamaServer) -> None:
    server.fault = first_calls(1, "http_500")
    llm = backend(server.url)
    with pytest.raises(LLMError):
        llm.complete(agent_request())
    assert llm.complete(agent_request("again")).text == "Answer to: again"


def test_missing_model_is_permanent_and_says_pull(server: OllamaServer) -> None:
    with pytest.raises(LLMError) as caught:
        backend(server.url, model="qwen2.5:7b").complete(agent_request())
    assert not caught.value.transient
    assert "ollama pull qwen2.5:7b" in str(caught.value)


def test_stalled_server_times_out_as_transient(server: OllamaServer) -> None:
    server.fault = lambda body: "stall"
    with pytest.raises(LLMError) as caught:
        backend(server.url, timeout=0.2).complete(agent_request())
    assert caught.value.transient
    assert "did not answer within 0.2 s" in str(caught.value)


def test_dropped_connection_is_transient(server: OllamaServer) -> None:
    server.fault = lambda body: "drop"
    with pytest.raises(LLMError) as caught:
        backend(server.url).complete(agent_request())
    assert caught.value.transient


def test_malformed_body_is_an_llm_error(server: OllamaServer) -> None:
    server.fault = lambda body: "malformed"
    with pytest.raises(LLMError) as caught:
        backend(server.url).complete(agent_request())
    assert "malformed response" in str(caught.value)
    assert not caught.value.transient


def test_refused_connection_on_a_call_is_transient() -> None:
    with pytest.raises(LLMError) as caught:
        backend(closed_port_url()).complete(agent_request())
    assert caught.value.transient
    assert "ollama serve" in str(caught.value)


def test_check_without_a_server_says_how_to_start_one() -> None:
    url = closed_port_url()
    with pytest.raises(LLMUnavailable) as caught:
        backend(url).check()
    assert str(caught.value) == (
        f"cannot reach Ollama at {url}: start it with `ollama serve` (or set OLLAMA_HOST / --ollama-host)"
    )
    assert caught.value.exit_code == 2


def test_check_without_the_model_says_how_to_pull_it(server: OllamaServer) -> None:
    with pytest.raises(LLMUnavailable) as caught:
        backend(server.url, model="qwen2.5:7b").check()
    assert str(caught.value) == f"model qwen2.5:7b is not pulled on {server.url}: run `ollama pull qwen2.5:7b`"


def test_check_passes_and_reports_the_model_size(server: OllamaServer) -> None:
    llm = backend(server.url)
    llm.check()
    assert llm.footprint().gpu_model_bytes == server.models[DEFAULT_MODEL]
    assert llm.describe() == f"ollama {DEFAULT_MODEL} at {server.url}"


def test_a_model_without_a_tag_means_latest() -> None:
    with OllamaServer(models={"gemma3:latest": 815_000_000}) as server:
        backend(server.url, model="gemma3").check()
        assert server_has_model(server.url, "gemma3")
        assert not server_has_model(server.url, "gemma3:4b")


def test_server_has_model_is_false_without_a_server() -> None:
    assert not server_has_model(closed_port_url(), DEFAULT_MODEL, timeout=1)


def test_host_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "http://10.0.0.5:11434")
    assert create_llm(LLMConfig(backend="ollama")).describe() == f"ollama {DEFAULT_MODEL} at http://10.0.0.5:11434"
    monkeypatch.delenv("OLLAMA_HOST")
    assert create_llm(LLMConfig(backend="ollama")).describe() == f"ollama {DEFAULT_MODEL} at http://127.0.0.1:11434"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hots": "x"}, "unknown option 'hots' (options: host, timeout, num_predict, temperature)"),
        ({"timeout": 0}, "option timeout: Input should be greater than 0"),
        ({"temperature": "hot"}, "option temperature"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        create_llm(LLMConfig(backend="ollama", options=options))


def test_reset_forgets_requests_and_restores_behaviour(server: OllamaServer) -> None:
    server.fault = lambda body: "http_500"
    with pytest.raises(LLMError):
        backend(server.url).complete(agent_request())
    server.reset()
    assert server.requests == [] and server.max_in_flight == 0 and server.fault is None


def test_a_streamed_answer_arrives_token_by_token_with_its_counts(server: OllamaServer) -> None:
    pieces: list[str] = []
    response = backend(server.url).complete(agent_request("Research A", on_text=pieces.append))

    assert response.text == "Answer to: Research A" and "".join(pieces) == response.text
    assert len(pieces) == len(response.text.split())  # one JSON line per token
    assert response.completion_tokens == len(pieces) and response.prompt_tokens == len("You are a RESEARCHER. Research A".split())
    assert server.chat_bodies()[-1]["stream"] is True


@pytest.mark.parametrize("stream", [False, True])
def test_the_budget_and_stops_go_as_model_options_and_the_done_reason_comes_back(server: OllamaServer, stream: bool) -> None:
    server.responder = lambda body: "one two three four five six"
    pieces: list[str] = []
    on_text = pieces.append if stream else None
    cut = backend(server.url).complete(agent_request(max_tokens=4, stop=("<|im_end|>", "\n\n"), on_text=on_text))
    whole = backend(server.url).complete(agent_request(max_tokens=6))

    assert [body["options"] for body in server.chat_bodies()] == [
        {"num_predict": 4, "stop": ["<|im_end|>", "\n\n"]},
        {"num_predict": 6, "stop": list(TEMPLATE_MARKERS)},
    ]
    assert (cut.text, cut.finish_reason) == ("one two three four", "length")
    assert (whole.text, whole.finish_reason) == ("one two three four five six", "stop")
