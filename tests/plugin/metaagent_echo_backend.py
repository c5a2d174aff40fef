"""A third-party backend, `echo`, as a separate distribution would ship it: conftest installs it (this
module and a dist-info naming it in the `metaagent_ray.backends` entry-point group) into a directory
on PYTHONPATH before Ray starts, so the driver and every Ray worker find it.

It imports only metaagent_ray's public types (the protocol among them) and answers with where it
ran, so a test can tell that every agent's output came from it, in a Ray worker.
"""

from __future__ import annotations

import os

from metaagent_ray.llm import LLM, LLMConfig, LLMRequest, LLMResponse, ModelFootprint

SIGNATURE = "echo-backend"


class EchoLLM(LLM):  # subclassing the protocol gives its defaults (needs_ray False)
    delegates = False
    prompt_style = "chat"

    def __init__(self, config: LLMConfig) -> None:
        self.config = config

    def describe(self) -> str:
        return "echo (a third-party test backend)"

    def check(self) -> None:
        return None

    def footprint(self) -> ModelFootprint:
        return ModelFootprint(source="echo: no model", instance_bytes=0, gpu_unused_reason="echo runs no model")

    def complete(self, request: LLMRequest) -> LLMResponse:
        return LLMResponse(text=f"{SIGNATURE} pid {os.getpid()}: agent {request.agent_id} {request.role}")


def create(config: LLMConfig) -> EchoLLM:
    return EchoLLM(config)
