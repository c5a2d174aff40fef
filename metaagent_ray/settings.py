"""How to run: `RunSettings`, every option of a run with its one default.

The API takes these settings, the limits agents and the runtime work under are made from them
(api.run_limits), the CLI's help shows their defaults, and the slot count is capped by the default
agent limit (resources.py). The record stores them, so `resume` runs alike.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .llm import CALL_TIMEOUT_S
from .pool import PoolSpec

INJECTED_FAULTS = "fail"  # the fake backend's fault-injection option: never stored for a resume
SECRET_WORDS = ("key", "token", "secret", "password")  # a backend option named with one is never stored: records are shared


class RunSettings(BaseModel):
    """How to run: backend, resources and limits. Stored in the record, so `resume` can run alike."""

    model_config = ConfigDict(extra="forbid")

    llm: str = "auto"
    model: str | None = None
    llm_options: dict[str, Any] = Field(default_factory=dict)
    slots: int | None = Field(default=None, ge=1)
    address: str | None = None
    retries: int = Field(default=2, ge=0, le=10)
    agent_timeout: float | None = Field(default=CALL_TIMEOUT_S, gt=0)
    on_failure: Literal["continue", "stop"] = "continue"
    max_depth: int = Field(default=2, ge=0)
    max_agents: int = Field(default=64, ge=1)
    max_total_agents: int = Field(default=200, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    pool: PoolSpec | None = None  # serve the model from this pool of server instances (GPU serving)

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of one setting, e.g. for the CLI's help."""
        return cls.model_fields[name].default

    def stored(self) -> dict[str, Any]:
        """What a resume may reuse: everything but injected faults and secrets (an API key comes again from its variable)."""
        options = {
            key: value
            for key, value in self.llm_options.items()
            if key != INJECTED_FAULTS and not any(word in key.lower() for word in SECRET_WORDS)
        }
        return self.model_copy(update={"llm_options": options}).model_dump()
