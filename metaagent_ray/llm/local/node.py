"""One local model server per node and model, owned by a Ray actor: every local agent is its client.

The `local` backend's engine (server.py) batches the requests of all its parallel slots into
shared decode steps, so a node runs ONE server: the weights are loaded once, each slot adds only its
context cache, and an agent waiting on the model is an HTTP request, not a model in a process. The
server lives in a named, detached actor pinned to its node; the first call on a node creates it
(`get_if_exists`), later calls from any process of that node (agents' workers, the driver's
coordinator) find it by name. Its parallel slots are the node's `llm_slot` count, so every agent
Ray lets call at once is decoded at once.

This is the local backend's only module that needs Ray (and the slot count, resources.py), so the
package's `__init__` does not import it; it holds the `local` backend's factory, the entry point
pyproject.toml names. The actor lives as long as the Ray instance: embedded Ray ends with the driver;
on a cluster the model stays loaded for the next run.
"""

from __future__ import annotations

import hashlib

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ...resources import SLOT_RESOURCE, default_slots
from ..base import LLMConfig, LLMUnavailable
from .client import LocalLLM
from .options import LocalOptions, options_of
from .server import LocalServer, ServerEndpoint

NAMESPACE = "metaagent-ray"


@ray.remote(num_cpus=0)
class NodeModelServer:
    """Holds this node's `LocalServer`; its only method says where the server listens."""

    def __init__(self, model: str | None, options: LocalOptions, parallel: int) -> None:
        self._server = LocalServer(model, options, parallel)

    def endpoint(self) -> ServerEndpoint:
        return self._server.endpoint


def node_parallel(config: LLMConfig, node_id: str) -> int:
    """The node's `llm_slot` count; a node started without it gets the count this machine computes."""
    for node in ray.nodes():
        if node["NodeID"] == node_id and node["Alive"]:
            slots = int(node["Resources"].get(SLOT_RESOURCE, 0))
            if slots > 0:
                return slots
    return default_slots(config).slots


def node_server(config: LLMConfig) -> ServerEndpoint:
    """This node's server for `config`, started on first use; one line (LLMUnavailable) if it cannot start."""
    if not ray.is_initialized():
        raise LLMUnavailable("local backend: Ray is not running here; the model server is a Ray actor on each node (use MetaAgent)")
    node_id = ray.get_runtime_context().get_node_id()
    digest = hashlib.sha256(config.cache_key().encode()).hexdigest()[:12]
    actor = NodeModelServer.options(  # type: ignore[attr-defined]
        name=f"local-llm-{node_id[:16]}-{digest}",
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    ).remote(config.model, options_of(config), node_parallel(config, node_id))
    try:
        return ray.get(actor.endpoint.remote())
    except RayActorError as error:
        cause = error.__cause__ or error
        message = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        raise LLMUnavailable(f"local backend: the model server did not start on this node: {message}") from None


class NodeLocalLLM(LocalLLM):
    """The `local` backend as runs use it: a client of its node's server, which needs Ray to be running."""

    needs_ray = True


def create(config: LLMConfig) -> NodeLocalLLM:
    """The `local` entry point's factory: validates options now; the server is found (or started) on the first call."""
    return NodeLocalLLM(config.model, options_of(config), lambda: node_server(config))
