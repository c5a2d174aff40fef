"""The `scripted` backend, for tests: a function the test names answers every request (pydantic-ai's FunctionModel).

The function is named by import path, option `function="package.module:name"`, so every process
finds it, Ray workers included, as long as its module is importable there. It takes the
`LLMRequest` and returns the answer's text or a whole `LLMResponse`; it may raise `LLMError` to
fail a call. `delegates` and `prompt_style` are options, so a test can play an instruct model or a
base model. No model runs: the switch that forbids real models in tests does not apply.
"""

from __future__ import annotations

import pkgutil
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import ConfigError
from .base import LLM, LLMConfig, LLMRequest, LLMResponse, ModelFootprint, PromptStyle, parse_options

Script = Callable[[LLMRequest], "str | LLMResponse"]


class ScriptedOptions(BaseModel):
    """The function that answers, and the kind of model the backend plays."""

    model_config = ConfigDict(extra="forbid")

    function: str = Field(description='"package.module:name" of a function from LLMRequest to str or LLMResponse')
    delegates: bool = True
    prompt_style: PromptStyle = "chat"

    @field_validator("function")
    @classmethod
    def _import_path(cls, value: str) -> str:
        if value.count(":") != 1:
            raise ValueError(f"{value!r} is not 'package.module:name'")
        return value


def load_script(path: str) -> Script:
    """The function at "package.module:name"; ConfigError when it cannot be found."""
    try:
        function = pkgutil.resolve_name(path)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"scripted backend: cannot load {path}: {error}") from None
    if not callable(function):
        raise ConfigError(f"scripted backend: {path} is not a function")
    return function


class ScriptedLLM(LLM):
    """Answers with whatever its function returns."""

    def __init__(self, options: ScriptedOptions) -> None:
        self.options = options
        self.delegates = options.delegates
        self.prompt_style: PromptStyle = options.prompt_style
        self._script = load_script(options.function)

    def describe(self) -> str:
        return f"scripted ({self.options.function})"

    def check(self) -> None:
        return None

    def footprint(self) -> ModelFootprint:
        return ModelFootprint(source="scripted: no model", instance_bytes=0, gpu_unused_reason="the scripted backend runs no model")

    def complete(self, request: LLMRequest) -> LLMResponse:
        answer = self._script(request)
        return answer if isinstance(answer, LLMResponse) else LLMResponse(text=answer)


def create(config: LLMConfig) -> ScriptedLLM:
    return ScriptedLLM(parse_options("scripted", ScriptedOptions, config.options))
