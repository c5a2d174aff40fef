"""An LLM instance pool for GPU serving: N model servers as Ray actors, each LLM call routed to a free one.

Each instance is an `LLMServer` actor that reserves `gpus_per_instance` GPUs from Ray (fractions
below 1 pack several instances on one GPU) and runs the server command as a child process, pinned to
the GPUs Ray assigned it through CUDA_VISIBLE_DEVICES: `ollama serve` on its own port (OLLAMA_HOST),
or an OpenAI-compatible server such as `vllm serve` or `llama-server`. The process ends when the
pool stops, and with its actor if the actor dies first.

An `LLMPool` actor routes. Every call of the `pooled` backend (llm/pooled.py) leases the least-busy
instance that has room, calls it through the `ollama` or `openai` backend, and gives it back: an
instance serves `requests_per_instance` calls at a time, one by default, so instances are LLM slots.
A lease that is never given back (its agent was killed mid-call) expires after the call's time limit.

The command is a template, so the pool runs without any GPU: on logical GPUs (`ray.init(num_gpus=2)`)
with a stand-in server (tests/stand_in_server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import ray
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.actor import ActorHandle

from .errors import MetaAgentError
from .llm import LLMConfig
from .llm.pooled import Lease, ServerApi

DEFAULT_COMMANDS: dict[str, str] = {
    "ollama": "ollama serve",
    "openai": "vllm serve {model} --host {host} --port {port}",
}
DEFAULT_ENV: dict[str, dict[str, str]] = {"ollama": {"OLLAMA_HOST": "{host}:{port}"}, "openai": {}}
READY_PATHS: dict[str, str] = {"ollama": "/", "openai": "/v1/models"}  # 200 once the server serves
URL_SUFFIX: dict[str, str] = {"ollama": "", "openai": "/v1"}
PLACEMENT_TIMEOUT_S = 30.0
STOP_GRACE_S = 10.0  # seconds between SIGTERM and SIGKILL
READY_PROBE_S = 0.2  # seconds between readiness probes while a server starts
TAIL_LINES = 5
TAIL_BYTES = 8192  # read only the end of a long server log


class PoolError(MetaAgentError):
    """The pool could not start: a server would not run or answer, or the instances do not fit the cluster's GPUs."""


class PoolSpec(BaseModel):
    """What to serve and how many times. `command` and `env` values are templates: {host}, {port}, {model}
    (write a literal brace as {{ or }})."""

    model_config = ConfigDict(extra="forbid")

    instances: int = Field(default=1, ge=1)
    gpus_per_instance: float = Field(default=1.0, ge=0)  # 0.5 packs two instances per GPU; 0 reserves none
    requests_per_instance: int = Field(default=1, ge=1)  # calls one instance serves at once
    api: ServerApi = "ollama"
    model: str | None = None  # None: the backend's default (ollama) or the served model (openai)
    command: str | None = None  # None: DEFAULT_COMMANDS[api]
    env: dict[str, str] = Field(default_factory=dict)  # added to DEFAULT_ENV[api] and the actor's environment
    host: str = "127.0.0.1"  # where servers listen; 0.0.0.0 to reach them from other nodes
    base_port: int | None = Field(default=None, ge=1, le=65535)  # instance i on base_port + i; None: any free port
    ready_timeout: float = Field(default=300.0, gt=0)  # seconds for a server to answer after it starts
    cwd: str | None = None  # the servers' working directory (None: the actor's)
    backend_options: dict[str, Any] = Field(default_factory=dict)  # for the ollama or openai backend, e.g. timeout

    @field_validator("gpus_per_instance")
    @classmethod
    def _ray_can_grant(cls, value: float) -> float:
        if value > 1 and not value.is_integer():
            raise ValueError("more than 1 GPU per instance must be a whole number (Ray shares only fractions below 1)")
        return value

    @model_validator(mode="after")
    def _templates_fill(self) -> PoolSpec:
        self.command_line(port=1)  # raises ValueError on a bad template
        self.server_env(port=1)
        return self

    def _fill(self, template: str, port: int) -> str:
        try:
            return template.format(host=self.host, port=port, model=self.model)
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"server command template {template!r}: {error} (placeholders: {{host}} {{port}} {{model}})") from None

    def command_line(self, port: int) -> list[str]:
        """The server command for an instance on `port`."""
        template = self.command or DEFAULT_COMMANDS[self.api]
        if "{model}" in template and self.model is None:
            raise ValueError(f"the server command {template!r} needs a model")
        return [self._fill(part, port) for part in shlex.split(template)]

    def server_env(self, port: int) -> dict[str, str]:
        """The environment variables the server gets besides the actor's own."""
        return {key: self._fill(value, port) for key, value in {**DEFAULT_ENV[self.api], **self.env}.items()}


@dataclass(frozen=True)
class ServerInfo:
    """One running instance: `url` is what its backend takes (Ollama's host, or the OpenAI base URL)."""

    index: int
    url: str
    gpu_ids: list[str]
    pid: int
    log_path: str


_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None  # looked up before any fork


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the actor's process dies, however it dies (Linux)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _reachable_host(host: str) -> str:
    """The address others use: the node's IP when the server listens on every interface."""
    return ray.util.get_node_ip_address() if host in ("0.0.0.0", "::", "") else host


@ray.remote(num_cpus=0, max_restarts=0)
class LLMServer:
    """One model server process on this actor's GPU share.

    A plain (one call at a time) actor: its calls run on one thread for the actor's whole life, which
    the process's parent-death signal needs.
    """

    def __init__(self, spec: PoolSpec, index: int) -> None:
        self._spec = spec
        self._index = index
        self._gpu_ids = [str(gpu) for gpu in ray.get_gpu_ids()]
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = ""

    def gpu_ids(self) -> list[str]:
        """The GPUs Ray assigned this instance (empty with gpus_per_instance=0)."""
        return self._gpu_ids

    def start(self) -> ServerInfo:
        """Start the server and return once it answers HTTP; PoolError with its output's tail if it cannot."""
        spec = self._spec
        port = spec.base_port + self._index if spec.base_port is not None else _free_port(spec.host)
        argv = spec.command_line(port)
        env = {**os.environ, **spec.server_env(port)}
        if self._gpu_ids:  # set explicitly: Ray leaves it alone under RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self._gpu_ids)
        with tempfile.NamedTemporaryFile(prefix=f"metaagent-llm-server-{self._index}-", suffix=".log", delete=False) as log:
            self._log_path = log.name
            try:
                self._process = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=spec.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            except OSError as error:
                raise PoolError(f"LLM server {self._index}: cannot run `{argv[0]}`: {error.strerror or error}") from None
        root = f"http://{_reachable_host(spec.host)}:{port}"
        self._wait_ready(root + READY_PATHS[spec.api], shlex.join(argv))
        return ServerInfo(self._index, root + URL_SUFFIX[spec.api], self._gpu_ids, self._process.pid, self._log_path)

    def _wait_ready(self, probe_url: str, command: str) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._spec.ready_timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if client.get(probe_url).status_code == 200:
                        return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = self._tail()
                    self.stop()
                    raise PoolError(
                        f"LLM server {self._index}: `{command}` did not answer {probe_url} within {self._spec.ready_timeout:g} s; {tail}"
                    )
                try:  # sleeps between probes, and notices at once a server that exits
                    code = self._process.wait(timeout=min(READY_PROBE_S, remaining))
                except subprocess.TimeoutExpired:
                    continue
                raise PoolError(f"LLM server {self._index}: `{command}` exited with code {code} before it answered; {self._tail()}")

    def _tail(self) -> str:
        """The last lines the server printed, on one line."""
        with open(self._log_path, "rb") as log:
            log.seek(max(0, os.fstat(log.fileno()).st_size - TAIL_BYTES))
            text = log.read().decode("utf-8", errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()][-TAIL_LINES:]
        said = f"its output ends: {' | '.join(lines)}" if lines else "it printed nothing"
        return f"{said} (log: {self._log_path})"

    def stop(self) -> int | None:
        """End the server and whatever it started (SIGTERM, then SIGKILL); returns its exit code."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with contextlib.suppress(ProcessLookupError):  # children it left behind (e.g. Ollama's runners)
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.unlink(self._log_path)
        return process.returncode


@ray.remote(num_cpus=0)
class LLMPool:
    """Routes calls to instances and owns them: `acquire` lends the least-busy instance with room."""

    def __init__(self, servers: list[ActorHandle[LLMServer]], urls: list[str], requests_per_instance: int) -> None:
        self._servers = servers
        self._capacity = requests_per_instance
        self._busy = dict.fromkeys(urls, 0)
        self._served = dict.fromkeys(urls, 0)  # breaks ties: spread calls over idle instances
        self._leases: dict[str, tuple[str, asyncio.TimerHandle]] = {}  # lease id -> url, its expiry
        self._waiting = 0  # callers waiting for room
        self._changed = asyncio.Condition()

    def _has_room(self) -> bool:
        return any(busy < self._capacity for busy in self._busy.values())

    async def acquire(self, wait: float | None, hold: float) -> Lease | None:
        """Lend an instance for at most `hold` s; None if none had room within `wait` s (None: no limit).

        Callers wait in arrival order; the lent instance is the least busy, then the least used.
        """
        async with self._changed:
            self._waiting += 1
            try:
                await asyncio.wait_for(self._changed.wait_for(self._has_room), wait)
            except asyncio.TimeoutError:
                return None
            finally:
                self._waiting -= 1
            with_room = [url for url, busy in self._busy.items() if busy < self._capacity]
            url = min(with_room, key=lambda candidate: (self._busy[candidate], self._served[candidate]))
            self._busy[url] += 1
            self._served[url] += 1
            lease_id = uuid.uuid4().hex
            expiry = asyncio.get_running_loop().call_later(hold, lambda: asyncio.ensure_future(self.release(lease_id)))
            self._leases[lease_id] = (url, expiry)
            return Lease(lease_id, url)

    async def release(self, lease_id: str) -> None:
        """Give an instance back; a lease that expired or was given back already is ignored."""
        async with self._changed:
            if lease_id not in self._leases:
                return
            url, expiry = self._leases.pop(lease_id)
            expiry.cancel()
            self._busy[url] -= 1
            self._changed.notify_all()

    async def urls(self) -> list[str]:
        return list(self._busy)

    async def stats(self) -> dict[str, Any]:
        """Callers waiting now, and per instance: calls in progress now and calls served so far."""
        instances = [{"url": url, "busy": busy, "served": self._served[url]} for url, busy in self._busy.items()]
        return {"waiting": self._waiting, "instances": instances}

    async def stop(self) -> None:
        """Stop every server process."""
        # a server whose actor died has no process left: its error is no reason to stop the others
        await asyncio.gather(*(server.stop.remote() for server in self._servers), return_exceptions=True)


class PoolHandle:
    """A running pool, for the driver: `llm_config()` for the agents, `stop()` when done."""

    def __init__(self, spec: PoolSpec, name: str, namespace: str, instances: list[ServerInfo], pool: ActorHandle[LLMPool], servers: list[ActorHandle[LLMServer]]
    ) -> None:
        self.spec = spec
        self.name = name  # the pool actor's name, which the `pooled` backend looks up
        self.namespace = namespace
        self.instances = instances
        self._pool = pool
        self._servers = servers
        self._stopped = False

    def llm_config(self) -> LLMConfig:
        """The `pooled` backend's config: every call goes through this pool."""
        options = {"pool": self.name, "namespace": self.namespace, "api": self.spec.api, "options": self.spec.backend_options}
        return LLMConfig(backend="pooled", model=self.spec.model, options=options)

    def describe(self) -> str:
        where = "; ".join(f"{info.url} (GPU {','.join(info.gpu_ids) or 'none'})" for info in self.instances)
        return f"{len(self.instances)} {self.spec.api} server instances: {where}"

    def stats(self) -> dict[str, Any]:
        """Callers waiting for an instance, and each instance's calls in progress and served."""
        return ray.get(self._pool.stats.remote())

    def stop(self) -> None:
        """Stop every server process, then the pool's actors; once stopped, does nothing."""
        if self._stopped:
            return
        self._stopped = True
        try:
            ray.get(self._pool.stop.remote(), timeout=STOP_GRACE_S + PLACEMENT_TIMEOUT_S)
        finally:
            for actor in (self._pool, *self._servers):
                ray.kill(actor)

    def __enter__(self) -> PoolHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _wait_all(refs: list[ray.ObjectRef], timeout: float, late: str) -> list[Any]:
    """Every result, failing at the first error (one line) or when `timeout` s pass (`late`)."""
    deadline = time.monotonic() + timeout
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise PoolError(late)
        try:
            ray.get(ready[0])
        except ray.exceptions.RayTaskError as error:
            cause = error.cause
            raise PoolError(str(cause) if isinstance(cause, PoolError) else f"{type(cause).__name__}: {cause}") from None
        except ray.exceptions.RayActorError as error:
            raise PoolError(f"an LLM server's actor died: {str(error).splitlines()[0]}") from None
    return ray.get(refs)


def start_pool(spec: PoolSpec) -> PoolHandle:
    """Start `spec.instances` servers as Ray actors, wait until each answers, and return the pool.

    Ray must be running (runtime.ensure_ray). Raises PoolError, one line, when the GPUs do not
    suffice or a server fails; no server is left running then.
    """
    if not ray.is_initialized():
        raise PoolError("start Ray before the LLM pool")
    needed = spec.instances * spec.gpus_per_instance
    have = ray.cluster_resources().get("GPU", 0.0)
    each = f"{spec.instances} LLM servers with {spec.gpus_per_instance:g} GPU each"
    if needed > have:
        raise PoolError(f"{each} need {needed:g} GPUs; the Ray cluster has {have:g}")
    servers = [LLMServer.options(num_gpus=spec.gpus_per_instance).remote(spec, index) for index in range(spec.instances)]
    try:
        _wait_all(
            [server.gpu_ids.remote() for server in servers],
            PLACEMENT_TIMEOUT_S,
            f"Ray could not place {each} within {PLACEMENT_TIMEOUT_S:g} s (GPU fractions must fit one GPU each)",
        )
        instances: list[ServerInfo] = _wait_all(
            [server.start.remote() for server in servers],
            spec.ready_timeout + PLACEMENT_TIMEOUT_S,  # each server enforces ready_timeout itself
            f"the LLM servers did not start within {spec.ready_timeout + PLACEMENT_TIMEOUT_S:g} s",
        )
    except BaseException:
        for server in servers:  # the processes get SIGTERM as their actors die
            ray.kill(server)
        raise
    name = f"metaagent-llm-pool-{uuid.uuid4().hex[:12]}"
    pool = LLMPool.options(name=name).remote(servers, [info.url for info in instances], spec.requests_per_instance)
    return PoolHandle(spec, name, ray.get_runtime_context().namespace, instances, pool, servers)
