"""Backends are entry points (group `metaagent_ray.backends`): the built-in ones, a third-party one and
the scripted test backend are found by name in the driver and in every Ray worker, and real models
are off in tests not marked `model`. Every backend that reaches a server is bounded alike: budgets,
stops, and answers cut at template markers and loops (llm/bounds.py)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest
import ray

from metaagent_ray import MetaAgent
from metaagent_ray.agents import DOCUMENT_STOP
from metaagent_ray.errors import ConfigError
from metaagent_ray.llm import LLMConfig, LLMRequest, ModelRequestsForbidden, available_backends, create_llm
from metaagent_ray.llm.bounds import TEMPLATE_MARKERS
from metaagent_ray.llm.llama_server import CHATML_FALLBACK
from metaagent_ray.llm.local import local_backend_available
from metaagent_ray.record import RunRecord
from metaagent_ray.settings import RunSettings
from tests.stand_in_server import StandInServer

PLAN = {
    "description": "Two researchers, an analyzer, a writer",
    "agents": [
        {"role": "RESEARCHER", "task": "Research A", "depends_on": []},
        {"role": "RESEARCHER", "task": "Research B", "depends_on": []},
        {"role": "ANALYZER", "task": "Compare A and B", "depends_on": [0, 1]},
        {"role": "WRITER", "task": "Write it up", "depends_on": [2]},
    ],
}
BUILT_IN = {"fake", "local", "ollama", "openai", "scripted"}


@ray.remote(num_cpus=0)
def backends_in_a_worker() -> tuple[int, list[str]]:
    return os.getpid(), available_backends()


@pytest.mark.usefixtures("ray_session")
def test_every_process_finds_the_built_in_backends_and_the_installed_third_party_one():
    pid, in_worker = ray.get(backends_in_a_worker.remote())
    assert pid != os.getpid()
    assert set(in_worker) == set(available_backends()) == BUILT_IN | {"echo"}


@pytest.mark.usefixtures("ray_session")
def test_a_third_party_backend_answers_every_agent_on_ray_workers():
    record = MetaAgent(llm="echo").execute(PLAN, save=False)
    assert record.status == "ok" and record.llm.backend == "echo"
    for agent in record.agents:
        answer = re.fullmatch(r"echo-backend pid (\d+): agent (\d+) (\w+)", agent.output)
        assert answer is not None, agent.output
        assert (int(answer[2]), answer[3]) == (agent.id, agent.role)
        assert int(answer[1]) != os.getpid() and agent.node  # answered in a Ray worker


def by_role(request: LLMRequest) -> str:
    """The scripted backend's function in these tests (tests.test_backends:by_role)."""
    return f"scripted answer of the {request.role} for agent {request.agent_id}, inputs {request.inputs_from}"


@pytest.mark.usefixtures("ray_session")
def test_the_scripted_backend_loads_its_function_by_name_in_ray_workers():
    record = MetaAgent(llm="scripted", llm_options={"function": f"{__name__}:by_role"}).execute(PLAN, save=False)
    assert [agent.output for agent in record.agents] == [
        "scripted answer of the RESEARCHER for agent 0, inputs []",
        "scripted answer of the RESEARCHER for agent 1, inputs []",
        "scripted answer of the ANALYZER for agent 2, inputs [0, 1]",
        "scripted answer of the WRITER for agent 3, inputs [2]",
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "scripted backend: option function: Field required"),
        ({"function": "tests.test_backends.by_role"}, "is not 'package.module:name'"),
        ({"function": "tests.test_backends:nothing"}, "cannot load tests.test_backends:nothing"),
        ({"function": "tests.test_backends:by_role", "answers": 3}, "scripted backend: unknown option 'answers'"),
    ],
)
def test_bad_scripted_options_are_one_line(options: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        create_llm(LLMConfig(backend="scripted", options=options))


@pytest.mark.usefixtures("echo_backend")
def test_an_unknown_backend_names_the_installed_ones_and_the_entry_point_group():
    with pytest.raises(ConfigError, match="unknown LLM backend 'nosuch' \\(backends: echo, fake, .*entry point in the group 'metaagent_ray.backends'"):
        create_llm(LLMConfig(backend="nosuch"))


def test_a_real_model_outside_a_model_test_fails_loudly():
    with pytest.raises(ModelRequestsForbidden, match="ollama backend: model requests are off here .* the model at http://192.0.2.1:11434"):
        create_llm(LLMConfig(backend="ollama", options={"host": "http://192.0.2.1:11434"})).check()
    with pytest.raises(ModelRequestsForbidden, match="openai backend: model requests are off"):
        create_llm(LLMConfig(backend="openai", options={"base_url": "http://192.0.2.1:8000/v1"})).check()
    if local_backend_available():
        with pytest.raises(ModelRequestsForbidden, match="local backend: .*a model in this process"):
            create_llm(LLMConfig(backend="local")).check()


# What a model that never ends its answers writes, by task: a loop, a prompt echo after a template
# marker, a turn opened by markers; and one plain answer.
RUNAWAY = {
    "Research A": "A is a language for the web. " * 300,
    "Research B": "B is fast.<|im_end|>\n<|im_start|>assistant\nThe user's request: Compare A and B",
    "Compare A and B": "<start_of_turn>model\nA reads well; B runs fast.<end_of_turn>\n<start_of_turn>user",
    "Write it up": "A for ease, B for speed.",
}
KEPT = {
    "Research A": "A is a language for the web.",
    "Research B": "B is fast.",
    "Compare A and B": "A reads well; B runs fast.",
    "Write it up": "A for ease, B for speed.",
}


def task_of(body: dict[str, Any]) -> str:
    """The agent's task in a chat request ("Your task in the plan:" then the task) or a document ("Task: ..." last)."""
    text = body["prompt"] if "prompt" in body else body["messages"][-1]["content"]
    lines = text.splitlines()
    if "Your task in the plan:" in lines:
        return lines[lines.index("Your task in the plan:") + 1]
    return [line.removeprefix("Task: ") for line in lines if line.startswith("Task: ")][-1]


def runaway(body: dict[str, Any]) -> str:
    if body.get("format") is not None or body.get("response_format") is not None:
        return json.dumps(PLAN)
    return RUNAWAY[task_of(body)]


def bounds_of(body: dict[str, Any]) -> tuple[int, list[str]]:
    """The budget and stop sequences a request gave, in its API's words."""
    if "options" in body:  # Ollama
        return body["options"]["num_predict"], body["options"]["stop"]
    return body["max_tokens"], body["stop"]


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize(
    ("backend", "props", "style"),
    [("ollama", None, "chat"), ("openai", None, "chat"), ("openai", {"chat_template": CHATML_FALLBACK}, "document")],
    ids=["ollama", "openai-chat", "openai-document"],
)
def test_every_server_backend_gets_the_same_bounds_and_no_answer_keeps_a_marker_or_a_loop(backend, props, style, tmp_path):
    """A server whose model never stops (the stand-in ignores stop sequences, like a model past them):
    every request carries its role's budget for the model's style and the stops; each answer is cut
    at its first template marker and before its first repeat; the record says why each ended."""
    with StandInServer(api=backend, models=["test-model"], responder=runaway, props=props) as server:
        where = {"host": server.url} if backend == "ollama" else {"base_url": server.base_url}
        record = MetaAgent(llm=backend, model="test-model", llm_options=where).run("Compare A and B", run_dir=tmp_path / "run")
        bodies = server.chat_bodies()

    budgets = RunSettings().answer_tokens.of(style)
    plan_body, *agent_bodies = bodies
    assert bounds_of(plan_body)[0] == budgets.plan
    roles = {spec["task"]: spec["role"] for spec in PLAN["agents"]}
    for body in agent_bodies:
        budget, stop = bounds_of(body)
        assert budget == budgets.of_role(roles[task_of(body)])
        assert stop[: len(TEMPLATE_MARKERS)] == list(TEMPLATE_MARKERS)
        assert ("prompt" in body) is (style == "document")
        if style == "document":  # the document's own stops: the next example, a new paragraph, a second answer
            assert set(DOCUMENT_STOP) <= set(stop)
    assert record.status == "ok"
    assert {agent.task: agent.output for agent in record.agents} == KEPT
    assert not any(marker in record.final_output for marker in TEMPLATE_MARKERS)
    saved = RunRecord.model_validate_json((tmp_path / "run" / "record.json").read_text())
    cuts = {agent.task: (agent.repetition_cut, agent.finish_reason) for agent in saved.agents}
    assert cuts == {
        "Research A": (True, "length"),  # looped until its budget ran out
        "Research B": (False, "stop"),
        "Compare A and B": (False, "stop"),
        "Write it up": (False, "stop"),
    }
