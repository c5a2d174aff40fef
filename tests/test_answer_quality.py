"""What keeps a small model's answers readable: the loop guard, the subjects the coordinator is told,
and delegation offered only to models that can use it (no model runs here)."""

from __future__ import annotations

import pytest

from metaagent_ray.agents import AgentContext, run_agent
from metaagent_ray.coordinator import coordinator_request, make_plan, nearest_example
from metaagent_ray.llm import LLMConfig, LLMRequest, get_llm
from metaagent_ray.llm.bounds import cut_repetition
from metaagent_ray.llm.local import LocalOptions
from metaagent_ray.llm.local.client import request_body
from metaagent_ray.paths import AgentPath
from metaagent_ray.plan import AgentSpec, Role
from metaagent_ray.prompts import load_prompt
from metaagent_ray.record import AgentRecord
from metaagent_ray.settings import RunSettings
from metaagent_ray.subjects import QueryShape, enumerated_subjects

LOOP = (
    "Python is easy to read and has Django and FastAPI. "
    "If I had a task that required more than one answer, my reply would be this one.\n\n"
    "If I had a task that required more than one answer, my reply would be this one.\n\n"
    "If I had a task that required more than one answer, my reply would be this one."
)


def test_an_answer_that_loops_ends_before_its_first_repeat():
    text, cut = cut_repetition(LOOP)
    assert cut
    assert text == "Python is easy to read and has Django and FastAPI. If I had a task that required more than one answer, my reply would be this one."


def test_a_repeated_paragraph_is_cut_and_case_or_spacing_does_not_hide_it():
    text, cut = cut_repetition("Rust is fast and memory safe.\n\nIt has Actix and Axum.\n\nRUST is  fast and memory safe.")
    assert cut and text == "Rust is fast and memory safe.\n\nIt has Actix and Axum."


def test_an_answer_without_repeats_and_short_repeats_are_kept():
    text = "- Speed: fast.\n- Safety: yes.\n- Tooling: yes.\n\nRust wins on speed, Python on time to market."
    assert cut_repetition(text) == (text, False)


@pytest.mark.parametrize(
    ("query", "subjects"),
    [
        ("Compare Python and Rust for web development", ["Python", "Rust"]),
        ("Compare Python, Rust, and Go for web development", ["Python", "Rust", "Go"]),
        ("Evaluate PostgreSQL, MySQL and SQLite", ["PostgreSQL", "MySQL", "SQLite"]),
        ("Compare Python, Rust, Go, and JavaScript for backend development", ["Python", "Rust", "Go", "JavaScript"]),
        ("Design full-stack architecture: frontend, backend, database, deployment", ["frontend", "backend", "database", "deployment"]),
        ("Python vs Rust", ["Python", "Rust"]),
        ("Study the French Revolution, then use that to write a lesson plan", []),
        ("Explain how vaccines work", []),
    ],
)
def test_the_subjects_a_request_enumerates(query: str, subjects: list[str]):
    assert enumerated_subjects(query)[0] == subjects


def request_for(query: str) -> str:
    return coordinator_request(query, QueryShape.of(query))


def test_the_coordinator_is_told_the_subjects_and_only_when_there_are_some():
    assert request_for("Compare Python, Rust, and Go for web development").splitlines() == [
        "Compare Python, Rust, and Go for web development",
        "Subjects: Python; Rust; Go",
        'One RESEARCHER each: "Research Python for web development", "Research Rust for web development", "Research Go for web development"',
    ]
    assert request_for("Evaluate PostgreSQL, MySQL and SQLite").splitlines()[-1] == (
        'One RESEARCHER each: "Research PostgreSQL", "Research MySQL", "Research SQLite"'  # no purpose to add
    )
    assert request_for("Compare trains, planes, buses, cars, and bicycles for travel").splitlines()[-1].startswith(
        'One RESEARCHER each: "Research trains", "Research planes"'  # a long list: the purpose once, in the request
    )
    assert request_for("Read the file, analyze it, then write a report") == "Read the file, analyze it, then write a report"


@pytest.mark.parametrize(
    ("query", "example"),
    [
        ("Compare Python and Rust for web development", "Compare guitar and drums"),
        ("Evaluate PostgreSQL, MySQL and SQLite", "Compare bread, rice, and pasta"),
        ("Compare Python, Rust, Go, and JavaScript for backend development", "Evaluate walking, cycling, running, and swimming"),
        ("Compare trains, planes, buses, cars, bicycles, and ferries", "Compare oak, pine, maple, birch, and cedar"),
        ("Study the French Revolution, then use that to write a lesson plan", "Research the history of chess, then write a beginner's guide"),
        ("Explain how vaccines work", "Explain how tides work"),
    ],
)
def test_the_last_worked_example_has_the_requests_shape(query: str, example: str):
    """Subjects counted (five or more get the five-subject example), steps, or one subject."""
    assert nearest_example(QueryShape.of(query)).splitlines()[1] == example


REQUESTS: list[LLMRequest] = []  # what the scripted backend was asked, in this process


@pytest.mark.parametrize("chat_template", [True, False])
def test_instruct_and_base_models_get_the_same_subject_hint(chat_template: bool):
    """The hint is part of the coordinator's prompt whichever way the model is prompted: the chat
    messages an instruct model gets (Ollama and OpenAI send the same messages) or a base model's document."""
    query = "Compare Python, Rust, Go, and JavaScript for backend development"
    first = len(REQUESTS)
    make_plan(query, get_llm(recorder()), max_agents=8, answer_tokens=LIMITS.answer_tokens)
    request = REQUESTS[first]  # the first try (the scripted answer is no plan, so a retry follows)
    assert request.messages[-1].content == request_for(query)
    _, body = request_body(request, LocalOptions(), chat_template, 1.0)
    prompt = body["messages"][-1]["content"] if chat_template else body["prompt"]
    assert 'One RESEARCHER each: "Research Python for backend development", "Research Rust for backend development"' in prompt
    assert "json_schema" in body  # the plan's schema still constrains the answer


def answer_twice(request: LLMRequest) -> str:
    """The scripted backend's answer (tests.test_answer_quality:answer_twice): one sentence, repeated."""
    REQUESTS.append(request)
    return "An answer about the task, written once. An answer about the task, written once."


def recorder(**options: object) -> LLMConfig:
    return LLMConfig(backend="scripted", options={"function": f"{__name__}:answer_twice", **options})


LIMITS = RunSettings().limits()


@pytest.mark.parametrize("delegates", [True, False])
def test_delegation_is_offered_only_to_models_that_can_use_it(delegates: bool):
    spec = AgentSpec(role=Role.RESEARCHER, task="Research Rust", depends_on=[])
    context = AgentContext(path=AgentPath((0,)), spec=spec, query="Compare Python and Rust", llm=recorder(delegates=delegates), limits=LIMITS)
    result = run_agent(context, [])
    request = REQUESTS[-1]
    offer = load_prompt("agent_delegation")
    assert request.may_delegate is delegates
    assert (offer in request.messages[-1].content) is delegates
    assert result.output == "An answer about the task, written once." and result.repetition_cut


def test_a_base_model_gets_its_roles_worked_example_as_one_document_and_a_paragraph_budget():
    spec = AgentSpec(role=Role.ANALYZER, task="Compare Python and Rust", depends_on=[0])
    llm = recorder(delegates=False, prompt_style="document")
    context = AgentContext(path=AgentPath((1,)), spec=spec, query="Compare Python and Rust", llm=llm, limits=LIMITS)
    research = AgentRecord(id=0, role="RESEARCHER", task="Research Python", depends_on=[], layer=0, status="ok", output="Python is  easy.\nIt has Django.")
    run_agent(context, [research])
    request = REQUESTS[-1]
    (message,) = request.messages
    assert message.role == "document"
    # the task comes last, right before the answer starts, after the notes it works from
    assert message.content.endswith("Notes received:\n- Research Python: Python is easy. It has Django.\n\nTask: Compare Python and Rust\nAnalysis:")
    assert "Task: Compare honeybees and bumblebees as pollinators" in message.content  # a worked example
    assert request.max_tokens == LIMITS.answer_tokens.document.of_role("ANALYZER") == 160 and not request.may_delegate
    _, body = request_body(request, LocalOptions(), chat_template=False, repeat_penalty=1.0)
    assert "\nAnalysis:" in body["stop"] and "\nNotes received:" in body["stop"]  # a second answer, or the next example, ends it


@pytest.mark.model
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("query", ["Compare Python and Rust for web development", "Evaluate PostgreSQL, MySQL and SQLite"])
def test_the_embedded_model_neither_loops_nor_parrots_its_prompt(query: str):
    """The real Gemma 270M, end to end: every answer is there, none repeats itself, none copies a prompt
    instruction, and at most one of them borrows a run of a role's worked example.

    Borrowing is the residue benchmarks/README.md states: a synthesizer whose notes say little may take an
    example's subject (benchmarks/quality.py: 0-1 of 49 answers). Which one does depends on which calls
    the server batches together, so it is not the same from run to run; a prompt that invites copying
    shows in many answers at once (16 of 45 with an example on Java and Kotlin)."""
    pytest.importorskip("xllamacpp")
    from benchmarks.quality import copies_prompt, prompt_shingles
    from metaagent_ray import MetaAgent

    record = MetaAgent(llm="local").run(query, save=False)
    shingles, examples = prompt_shingles(), prompt_shingles(("document",))
    assert record.status == "ok"
    for agent in record.agents:
        assert agent.output.strip(), agent.path
        assert not cut_repetition(agent.output)[1], agent.output
        assert not copies_prompt(agent.output, shingles), agent.output
    borrowing = [agent.output for agent in record.agents if copies_prompt(agent.output, examples)]
    assert len(borrowing) <= 1, borrowing
