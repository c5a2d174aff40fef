"""The `pooled` backend: each call leases a model server of a running LLM pool (pool.py), calls it
through the `ollama` or `openai` backend, and gives it back whatever happens.

The pool is a named Ray actor that this backend finds by name from any process, so this backend
needs Ray; `pool.PoolHandle.llm_config()` writes its options. A lease holds an instance for at most
the call's time limit plus LEASE_GRACE_S: one never given back (its agent was killed mid-call)
expires on its own.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from typing import Any, Literal

import ray
from pydantic import BaseModel, ConfigDict, Field

from . import create_llm
from .base import (
    CALL_TIMEOUT_S,
    LLM,
    LLMConfig,
    LLMError,
    LLMRequest,
    LLMResponse,
    LLMUnavailable,
    ModelFootprint,
    PromptStyle,
    no_model_footprint,
    parse_options,
)

ServerApi = Literal["ollama", "openai"]
URL_OPTION: dict[str, str] = {"ollama": "host", "openai": "base_url"}  # the backend option naming the server
LEASE_GRACE_S = 30.0  # a lease outlives its call's time limit by this much before it is reclaimed


@dataclass(frozen=True)
class Lease:
    """An instance lent to one call: give it back with `LLMPool.release(lease.id)`."""

    id: str
    url: str


class PooledOptions(BaseModel):
    """The `pooled` backend's options, as `PoolHandle.llm_config()` writes them."""

    model_config = ConfigDict(extra="forbid")

    pool: str  # the LLMPool actor's name
    namespace: str | None = None  # its Ray namespace (None: the caller's)
    api: ServerApi = "ollama"
    options: dict[str, Any] = Field(default_factory=dict)  # for the ollama or openai backend


class PooledLLM(LLM):
    """A client of the named pool: the backend of each instance is made once, on its first lease."""

    delegates = True  # instruct models decide when a task needs a team
    prompt_style: PromptStyle = "chat"
    needs_ray = True  # the pool is a named Ray actor

    def __init__(self, model: str | None, options: PooledOptions) -> None:
        self.model = model
        self.options = options
        self._pool: Any = None
        self._backends: dict[str, LLM] = {}  # instance url -> its backend

    def describe(self) -> str:
        return f"{self.options.api} {self.model or '(default model)'} on the LLM pool {self.options.pool}"

    def footprint(self) -> ModelFootprint:
        return no_model_footprint("pooled", f"on the servers of the LLM pool {self.options.pool}")

    def _pool_actor(self) -> Any:
        if self._pool is None:
            try:
                self._pool = ray.get_actor(self.options.pool, namespace=self.options.namespace)
            except ValueError:
                raise LLMUnavailable(f"no LLM pool named {self.options.pool}: it was stopped, or started by another Ray job") from None
        return self._pool

    def _backend(self, url: str) -> LLM:
        if url not in self._backends:
            options = {**self.options.options, URL_OPTION[self.options.api]: url}
            self._backends[url] = create_llm(LLMConfig(backend=self.options.api, model=self.model, options=options))
        return self._backends[url]

    def check(self) -> None:
        """Every instance must serve the model."""
        for url in ray.get(self._pool_actor().urls.remote()):
            self._backend(url).check()

    def complete(self, request: LLMRequest) -> LLMResponse:
        try:
            pool = self._pool_actor()
        except LLMUnavailable as error:
            raise LLMError(str(error), transient=False) from None
        limit = request.timeout if request.timeout is not None else self.options.options.get("timeout", CALL_TIMEOUT_S)
        started = time.monotonic()
        try:
            lease: Lease | None = ray.get(pool.acquire.remote(request.timeout, limit + LEASE_GRACE_S))
        except ray.exceptions.RayError as error:
            raise LLMError(f"the LLM pool {self.options.pool} failed: {type(error).__name__}", transient=False) from None
        if lease is None:
            raise LLMError(f"no LLM server of the pool was free within {request.timeout:g} s", transient=True)
        try:
            if request.timeout is not None:  # the wait for an instance counts against the call's time
                request = replace(request, timeout=request.timeout - (time.monotonic() - started))
            return self._backend(lease.url).complete(request)
        finally:
            with contextlib.suppress(ray.exceptions.RayError):  # a pool that is gone has nothing to give back
                ray.get(pool.release.remote(lease.id))


def create(config: LLMConfig) -> PooledLLM:
    return PooledLLM(model=config.model, options=parse_options("pooled", PooledOptions, config.options))
