"""LLM serving the Ray way: a Ray Serve application of N model replicas behind one OpenAI-compatible path.

`--serve-llm CONFIG.yaml` names a `ServeLLMSpec` (serving.py). The run deploys it on the cluster (or attaches to a
running application of that name) and its agents call `{proxy}{route_prefix}/v1` through the `openai`
backend: nothing here is a backend of its own.

The application is two deployments, as Ray Serve LLM's own `build_openai_app` is:
- `OpenAIIngress`, one replica behind Serve's HTTP proxy: `/v1/chat/completions`, `/v1/completions`,
  `/v1/models` and llama.cpp's `/props`. It hands each call to a model replica through a
  `DeploymentHandle`, as an object with the request's `prompt` or `messages`, which is what Ray
  Serve's `PrefixCacheAffinityRouter` reads to keep a prompt on the replica that already holds its
  prefix; the HTTP proxy alone could not route by prompt. It also counts, per replica, the requests and
  tokens it served (`GET {route_prefix}/replicas`), which is how a run shows that both served.
- `LlamaCppReplica`, `replicas` of them: llama.cpp's server in the replica's process (the `local`
  backend's `LocalServer`, xllamacpp), with `parallel` slots batched together. Its
  `max_ongoing_requests` is `parallel`, so Serve never queues a request on a replica whose slots are
  all busy, and the run's slot count is `replicas * parallel`: the requests the replicas decode at once.
On GPUs a replica takes `gpus_per_replica` (Ray sets its CUDA_VISIBLE_DEVICES; a CUDA build of
xllamacpp offloads the model there), so `replicas` is one per GPU, or per GPU share.

FastAPI reads the ingress methods' annotations (a `Request` parameter) at run time, so this module
does not postpone them (no `from __future__ import annotations`).
"""

import json
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator

import httpx
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from .errors import MetaAgentError
from .llm import LLMConfig
from .llm.local import LocalOptions, LocalServer
from .serving import ServeLLMSpec

# Ray Serve's PrefixCacheAffinityRouter, by the module that defines it: its public alias
# (ray.serve.llm.request_router) is the same class, but importing ray.serve.llm needs vLLM or SGLang
# installed (Ray 2.60), and the llama.cpp replicas need neither.
PREFIX_ROUTER = "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router:PrefixCacheAffinityRouter"
INGRESS_MAX_ONGOING = 1000  # the ingress only awaits the replicas: Serve's default of 5 would cap the run


class ServeLLMError(MetaAgentError):
    """The Serve application could not be deployed or found."""


def request_router(spec: ServeLLMSpec) -> RequestRouterConfig:
    """Ray Serve's prefix-aware router with its load threshold, or Serve's default (power of two choices)."""
    if spec.router == "power_of_two":
        return RequestRouterConfig()
    return RequestRouterConfig(request_router_class=PREFIX_ROUTER, request_router_kwargs={"imbalanced_threshold": spec.load_threshold})


class ChatCall(BaseModel):
    """A chat request on its way to a replica; `messages` is the attribute Serve's prefix router reads."""

    messages: list[dict[str, Any]]
    body: dict[str, Any]


class CompletionCall(BaseModel):
    """A completion (a document prompt, for models without a chat template); the router reads `prompt`."""

    prompt: str
    body: dict[str, Any]


class Served(BaseModel):
    """What one replica did for one request: the ingress adds these up per replica."""

    replica: str
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens llama.cpp took from a slot's cache instead of reading them again
    completion_tokens: int = 0


def _served(replica: str, usage: dict[str, Any] | None) -> Served:
    usage = usage or {}
    return Served(
        replica=replica,
        prompt_tokens=usage.get("prompt_tokens") or 0,
        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
    )


class LlamaCppReplica:
    """One model replica: llama.cpp's server in this process, `parallel` slots batched together.

    A request that sets no sampling of its own (the `openai` backend sends none unless told) samples
    as `--llm local` does, with the spec's `local` options, not with llama.cpp's defaults
    (temperature 0.8, a random seed).
    """

    def __init__(self, model: str | None, options: LocalOptions, parallel: int) -> None:
        self._server = LocalServer(model, options, parallel)  # held: the server lives as long as this object
        self._sampling = {"temperature": options.temperature, "seed": options.seed, "repeat_penalty": options.repeat_penalty}
        self._client = httpx.AsyncClient(base_url=self._server.endpoint.address, timeout=None)  # the caller's backend sets the time limit
        self._replica = serve.get_replica_context().replica_id.unique_id

    async def answer(self, path: str, call: ChatCall | CompletionCall) -> tuple[int, Any, Served]:
        """A whole answer: the status, the server's JSON body, and what it took."""
        response = await self._client.post(path, json={**self._sampling, **call.body})
        body = response.json()
        return response.status_code, body, _served(self._replica, body.get("usage") if isinstance(body, dict) else None)

    async def stream(self, path: str, call: ChatCall | CompletionCall) -> AsyncIterator[bytes | Served]:
        """A streamed answer as the server sends it (server-sent events), then what it took."""
        usage: dict[str, Any] | None = None
        async with self._client.stream("POST", path, json={**self._sampling, **call.body}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line.removeprefix("data: ")).get("usage") or usage
                yield f"{line}\n".encode()
        yield _served(self._replica, usage)

    async def get(self, path: str) -> tuple[int, Any]:
        """A GET the ingress passes on: the served models, llama.cpp's /props (called with `path` by keyword:
        the prefix router reads positional arguments only, and a GET has no prompt)."""
        response = await self._client.get(path)
        return response.status_code, response.json()


ingress_app = FastAPI()


@dataclass
class ReplicaTally:
    """One replica's requests and tokens so far, as the ingress saw them."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def add(self, served: Served) -> None:
        self.requests += 1
        self.prompt_tokens += served.prompt_tokens
        self.cached_tokens += served.cached_tokens
        self.completion_tokens += served.completion_tokens


@serve.ingress(ingress_app)
class OpenAIIngress:
    """The application's OpenAI-compatible front: each call goes to the replica Serve's router picks."""

    def __init__(self, replicas: DeploymentHandle) -> None:
        self._replicas = replicas
        self._tally: dict[str, ReplicaTally] = {}

    def _count(self, served: Served) -> None:
        self._tally.setdefault(served.replica, ReplicaTally()).add(served)

    async def _relay(self, path: str, call: ChatCall | CompletionCall) -> Any:
        if call.body.get("stream"):
            chunks = self._replicas.options(stream=True).stream.remote(path, call)

            async def events() -> AsyncIterator[bytes]:
                async for chunk in chunks:
                    if isinstance(chunk, Served):
                        self._count(chunk)
                    else:
                        yield chunk

            return StreamingResponse(events(), media_type="text/event-stream")
        status, body, served = await self._replicas.answer.remote(path, call)
        self._count(served)
        return JSONResponse(body, status_code=status)

    @ingress_app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        body = await request.json()
        return await self._relay("/v1/chat/completions", ChatCall(messages=body.get("messages") or [], body=body))

    @ingress_app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        body = await request.json()
        return await self._relay("/v1/completions", CompletionCall(prompt=str(body.get("prompt", "")), body=body))

    @ingress_app.get("/v1/models")
    async def models(self) -> Any:
        status, body = await self._replicas.get.remote(path="/v1/models")
        return JSONResponse(body, status_code=status)

    @ingress_app.get("/props")
    async def props(self) -> Any:
        status, body = await self._replicas.get.remote(path="/props")
        return JSONResponse(body, status_code=status)

    @ingress_app.get("/replicas")
    async def replicas(self) -> dict[str, dict[str, int]]:
        """Requests and tokens per replica since the application started."""
        return {replica: asdict(tally) for replica, tally in self._tally.items()}


def build_app(spec: ServeLLMSpec) -> serve.Application:
    """The application: `spec.replicas` llama.cpp replicas, routed by `spec.router`, behind the ingress."""
    replica = serve.deployment(
        LlamaCppReplica,
        num_replicas=spec.replicas,
        max_ongoing_requests=spec.parallel,
        ray_actor_options={"num_cpus": spec.cpus_per_replica, "num_gpus": spec.gpus_per_replica},
        request_router_config=request_router(spec),
    )
    ingress = serve.deployment(OpenAIIngress, num_replicas=1, max_ongoing_requests=INGRESS_MAX_ONGOING, ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(spec.model, spec.local, spec.parallel))


class ServedLLM:
    """A Serve application the run uses: its URL, its slot count, and whether this run deployed it."""

    def __init__(self, spec: ServeLLMSpec, replicas: int, deployed: bool) -> None:
        self.spec = spec
        self.replicas = replicas
        self.deployed = deployed
        host = ray.util.get_node_ip_address() if spec.http_host in ("0.0.0.0", "::") else spec.http_host
        self.url = f"http://{host}:{spec.http_port}{spec.route_prefix}"

    @property
    def slots(self) -> int:
        """The requests the replicas decode at once: each replica's parallel slots, which Serve never overfills."""
        return self.replicas * self.spec.parallel

    def llm_config(self, options: dict[str, Any]) -> LLMConfig:
        """The `openai` backend, with the run's backend `options` (a timeout, say), pointed at the application's OpenAI-compatible path."""
        return LLMConfig(backend="openai", options={**options, "base_url": f"{self.url}/v1"})

    def describe(self) -> str:
        how = "deployed" if self.deployed else "attached to"
        return (
            f"Ray Serve application {self.spec.name} ({how}): {self.replicas} llama.cpp replicas × {self.spec.parallel} slots, "
            f"{self.spec.router} routing, at {self.url}/v1"
        )

    def stop(self) -> None:
        """Delete the application if this run deployed it; one it attached to keeps serving."""
        if self.deployed:
            serve.delete(self.spec.name)
            self.deployed = False


def _running_replicas(name: str) -> int | None:
    """The running model replicas of the application `name`, or None when no such application runs."""
    application = serve.status().applications.get(name)
    if application is None or application.status != "RUNNING":
        return None
    replicas = application.deployments.get(LlamaCppReplica.__name__)
    if replicas is None:
        raise ServeLLMError(f"the running Serve application {name} is not a metaagent LLM application (no {LlamaCppReplica.__name__})")
    return replicas.replica_states.get("RUNNING", 0)


def serve_llm(spec: ServeLLMSpec) -> ServedLLM:
    """Attach to the application `spec.name` if it runs, else deploy it and wait until every replica loaded its model.

    Ray must be running. Raises ServeLLMError, one line, when the application does not start.
    """
    if not ray.is_initialized():
        raise ServeLLMError("start Ray before the Serve application")
    running = _running_replicas(spec.name)
    if running is not None:
        return ServedLLM(spec, running, deployed=False)
    # One proxy, on the head node, where the driver runs (`metaagent submit` and cluster/ start it there):
    # the URL the agents are given names this node. Serve's default puts one on each node with a replica.
    serve.start(proxy_location="HeadOnly", http_options={"host": spec.http_host, "port": spec.http_port})
    try:
        serve.run(build_app(spec), name=spec.name, route_prefix=spec.route_prefix)
    except Exception as error:  # Serve raises RuntimeError (and others) with the replica's error inside
        serve.delete(spec.name)
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        raise ServeLLMError(f"the Serve application {spec.name} did not start: {lines[-1] if lines else type(error).__name__}") from None
    return ServedLLM(spec, _running_replicas(spec.name) or 0, deployed=True)
