"""Where a run's Ray is: embedded on this machine, or a cluster found by Ray's own address rules.

Apart from runtime.py (a run's driver) because connecting is about the user's environment
(addresses, tokens, heads that are down) and must finish, bounded and with one clear line when it
fails, before a run writes anything to disk. Ray's own connect retries for minutes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import ray
import ray._private.ray_constants as ray_constants  # no public switch: see _loopback_only
from ray._raylet import GcsClient  # no public bounded GCS call: see _check_gcs

from .errors import ConfigError
from .interrupts import keeping_handlers, stop_signals_ignored
from .llm import LLMConfig
from .resources import SLOT_RESOURCE, SlotPlan, default_slots

CONNECT_TIMEOUT_S = 10.0  # for each of: reaching the head's port, and its GCS answering
RAY_ADDRESS = "RAY_ADDRESS"  # Ray sets it in a Ray Job's driver, so a job runs on its cluster


@dataclass(frozen=True)
class RayOptions:
    """Where to run: an existing cluster (`address`) or embedded local Ray, and the LLM slot cap."""

    address: str | None = None
    slots: int | None = None
    verbose: bool = False


@dataclass(frozen=True)
class RayConnection:
    """The Ray a run uses: `address` None is Ray embedded in this process."""

    address: str | None
    nodes: int
    slots: int  # the llm_slot resources of all nodes
    slot_plan: SlotPlan | None = None  # how this machine's slots were counted, when Ray started here
    started_at: float | None = None  # when this process began starting or reaching Ray (None: it was up already)
    ready_at: float | None = None  # when it was ready

    def describe(self) -> str:
        """The first line of a run: where it runs."""
        if self.address is None:
            why = f" ({self.slot_plan.reasons[-1]}; see `metaagent resources`)" if self.slot_plan else ""
            return f"🖥️ Ray embedded on this machine: {self.slots} LLM slots{why}"
        nodes = f"{self.nodes} node" + ("" if self.nodes == 1 else "s")
        return f"🌐 Ray cluster at {self.address}: {nodes}, {self.slots} LLM slots ({SLOT_RESOURCE})"

    def check_slots(self, slots: int | None) -> None:
        """A run's `--slots` must fit in the cluster's llm_slot resources."""
        if slots is not None and self.slots < slots:
            raise ConfigError(
                f"--slots {slots}: the Ray cluster has only {self.slots} {SLOT_RESOURCE} resources "
                f"(start its nodes with --resources '{{\"{SLOT_RESOURCE}\": N}}')"
            )


LOOPBACK = "127.0.0.1"

_embedded = False  # whether this process started its Ray itself, and so stops it (shutdown_ray)
_connection: RayConnection | None = None  # the connection this process made, with its times


def ray_started() -> bool:
    """Whether this process is connected to a Ray already (the API says when it starts one)."""
    return ray.is_initialized()


def embedded() -> bool:
    """Whether the Ray this process uses is one it started: nothing else runs on it."""
    return _embedded


def cluster_address(options: RayOptions) -> str | None:
    """Ray's address rules: `--address` wins, else RAY_ADDRESS, else None (start Ray embedded)."""
    return options.address or os.environ.get(RAY_ADDRESS) or None


def ensure_ray(options: RayOptions, llm: LLMConfig | None = None) -> RayConnection:
    """Connect to the cluster (see `cluster_address`), or start Ray embedded with LLM slots for this machine.

    Embedded Ray gets as many LLM slots as the machine's RAM, cores and the model allow, and at
    least `slots`. A run's own cap is `slots`, reserved per run, so later runs in this process may
    ask for more. A cluster that cannot be reached is reported within about 2 x CONNECT_TIMEOUT_S.
    """
    global _embedded, _connection
    if ray.is_initialized():
        return _connection or _current(None)
    started_at = time.time()
    common: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.INFO if options.verbose else logging.ERROR,
        "log_to_driver": options.verbose,
    }
    address = cluster_address(options)
    if address is not None:
        address = _reachable(address, options.verbose)
        here = os.getcwd()
        try:
            keeping_handlers(lambda: ray.init(address=address, **common))
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ConfigError(f"cannot connect to the Ray cluster at {address}: {error}") from None
        # In a Ray Job with a working_dir, connecting may unpack that directory again under the
        # same path, leaving this process in a deleted one: relative paths would fail. Stand in the new one.
        with contextlib.suppress(OSError):
            os.chdir(here)
        _connection = replace(_current(None), started_at=started_at, ready_at=time.time())
        return _connection
    plan = default_slots(llm) if llm is not None else None
    node_slots = max(options.slots or 0, plan.slots if plan else 0) or None
    resources = {SLOT_RESOURCE: float(node_slots)} if node_slots else {}
    _private_token_file()
    try:
        with _loopback_only():
            keeping_handlers(
                lambda: ray.init(
                    address="local",  # a new instance of our own, even when another Ray runs on this machine
                    _node_ip_address=LOOPBACK,
                    resources=resources,
                    **common,
                )
            )
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ConfigError(f"cannot start Ray on this machine: {error}") from None
    _embedded = True
    _connection = replace(_current(plan), started_at=started_at, ready_at=time.time())
    return _connection


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """While Ray starts here, make its node address loopback, so that every server it starts (GCS,
    raylet, agents, workers: all are given that address) listens on loopback only.

    On Linux `ray.init` turns `_node_ip_address=127.0.0.1` into the machine's network address, and
    its servers then listen on every interface. Ray keeps the address given only where it does not
    form clusters (macOS, Windows), a switch it reads once, at import, from
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER: long before this runs. Ray has no public option for it, so
    the switch is set in this process for the start only (the processes Ray starts take the address
    from their command line, and need nothing).
    """
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _private_token_file() -> None:
    """Keep the token of the Ray about to start the user's alone.

    Ray started here turns token authentication on and keeps its token in ~/.ray/auth_token, which
    it writes readable by everyone (0644) when it makes one: any user of this machine could read it
    and drive this Ray. So the file is made first, the user's alone, for Ray to fill (it keeps the
    mode), and one already there is made the user's alone.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path.home() / ".ray" / "auth_token"
    with contextlib.suppress(OSError):  # a read-only home: Ray says what it needs itself
        path.parent.mkdir(mode=0o700, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)


def shutdown_ray() -> None:
    """Stop the Ray this process started (its GCS, raylet and workers); a cluster it joined keeps running.

    Stop signals are ignored meanwhile, so a second Ctrl-C cannot leave Ray's processes behind.
    """
    global _embedded, _connection
    if _embedded:
        with stop_signals_ignored():
            ray.shutdown()
        _embedded, _connection = False, None


def _current(plan: SlotPlan | None) -> RayConnection:
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    slots = int(ray.cluster_resources().get(SLOT_RESOURCE, 0))
    return RayConnection(address=None if _embedded else ray.get_runtime_context().gcs_address, nodes=nodes, slots=slots, slot_plan=plan)


def _reachable(address: str, verbose: bool) -> str:
    """The cluster's GCS address once its head answered and accepted this driver; else one line (ConfigError)."""
    if address.startswith(("http://", "https://")):
        raise ConfigError(
            f"{address} is a dashboard (Ray Jobs) address: submit to it with `metaagent submit --address {address}`; "
            "a driver connects to the head's GCS port instead (HEAD:6379)"
        )
    if address == "auto":
        address = latest_cluster()
        if address is None:
            raise ConfigError("--address auto: no Ray cluster started with `ray start` runs on this machine")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"Ray address {address!r}: expected HOST:PORT (the head's GCS port, 6379 unless `ray start --port` said otherwise)"
        )
    check_port(address, host, int(port), f"`ray start --head --port {port}`")
    if not address.startswith("ray://"):
        _check_gcs(address, verbose)
    return address


def latest_cluster() -> str | None:
    """The address `--address auto` means, by the rules `ray.init(address="auto")` documents:
    RAY_ADDRESS, else the GCS address the last `ray start` on this machine wrote to
    /tmp/ray/ray_current_cluster (RAY_TMPDIR, or on Linux TMPDIR, moves /tmp, as for Ray).

    Ray's own lookup also takes any GCS process it finds running, and waits minutes on a head that
    died leaving the file; here the address goes through the same bounded checks as any other.
    """
    if os.environ.get(RAY_ADDRESS):
        return os.environ[RAY_ADDRESS]
    temp = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None) or "/tmp"
    with contextlib.suppress(OSError):
        return (Path(temp) / "ray" / "ray_current_cluster").read_text(encoding="utf-8").strip() or None
    return None


def check_port(address: str, host: str, port: int, started_by: str) -> None:
    """One line (ConfigError) within CONNECT_TIMEOUT_S when nothing accepts connections at host:port."""
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        reason = "timed out" if isinstance(error, TimeoutError) else (error.strerror or str(error)).lower()
        raise ConfigError(
            f"cannot reach the Ray cluster at {address}: {reason}; check that its head runs ({started_by}) "
            f"and that this machine can reach {host} on port {port}"
        ) from None


def _check_gcs(address: str, verbose: bool) -> None:
    """Ask the head's GCS for its nodes, in a thread bounded by CONNECT_TIMEOUT_S.

    Ray's own GcsClient, because no public Ray call asks a GCS with a deadline and says when it
    rejects the token: `ray.init` retries for minutes on a port that accepts and never answers, and
    after 20 s reports a missing token as a bare ConnectionError.
    """
    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            GcsClient(address=address).get_all_node_info(timeout=CONNECT_TIMEOUT_S)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            outcome.append(error)

    with _quiet_stderr(not verbose):  # Ray's C++ client logs each failed try to stderr
        thread = threading.Thread(target=ask, daemon=True)
        thread.start()
        thread.join(CONNECT_TIMEOUT_S * 1.5)
    if not outcome:
        raise ConfigError(
            f"the Ray cluster at {address} accepted a connection but its GCS did not answer within {CONNECT_TIMEOUT_S * 1.5:.0f} s"
        )
    error = outcome[0]
    if isinstance(error, ray.exceptions.AuthenticationError):
        raise ConfigError(token_advice(address)) from None
    if error is not None:
        detail = next(iter(str(error).splitlines()), type(error).__name__)
        raise ConfigError(f"{address} does not answer as a Ray cluster's GCS ({detail}); is it the head's GCS port?") from None


def token_advice(address: str) -> str:
    """What to do when the cluster wants a token this driver does not send."""
    mode = os.environ.get("RAY_AUTH_MODE", "")
    have = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray" / "auth_token").exists()
    start = f"the Ray cluster at {address} requires an authentication token (token authentication is on)"
    if have and mode.lower() != "token":
        return f"{start}; a token is set here but Ray sends it only with RAY_AUTH_MODE=token: export RAY_AUTH_MODE=token"
    if have:
        return f"{start} and rejected this driver's: check RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token against `ray get-auth-token` on the head"
    return f"{start}: run `ray get-auth-token` on the head, then here export RAY_AUTH_TOKEN=<token> RAY_AUTH_MODE=token"


@contextlib.contextmanager
def _quiet_stderr(quiet: bool) -> Iterator[None]:
    """Send file descriptor 2 (where Ray's C++ code logs) to /dev/null for the block."""
    if not quiet:
        yield
        return
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
