"""Backends are entry points (group `metaagent_ray.backends`): the built-in ones, a third-party one and
the scripted test backend are found by name in the driver and in every Ray worker, and real models
are off in tests not marked `model`."""

from __future__ import annotations

import os
import re

import pytest
import ray

from metaagent_ray import MetaAgent
from metaagent_ray.errors import ConfigError
from metaagent_ray.llm import LLMConfig, LLMRequest, ModelRequestsForbidden, available_backends, create_llm
from metaagent_ray.llm.local import local_backend_available

PLAN = {
    "description": "Two researchers, an analyzer, a writer",
    "agents": [
        {"role": "RESEARCHER", "task": "Research A", "depends_on": []},
        {"role": "RESEARCHER", "task": "Research B", "depends_on": []},
        {"role": "ANALYZER", "task": "Compare A and B", "depends_on": [0, 1]},
        {"role": "WRITER", "task": "Write it up", "depends_on": [2]},
    ],
}
BUILT_IN = {"fake", "local", "ollama", "openai", "pooled", "scripted"}


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
    assert record.status == "ok" and record.llm["backend"] == "echo"
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
