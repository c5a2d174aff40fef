"""llama.cpp's server in this process (xllamacpp): the model loaded once, its parallel slots batched.

Which process holds it, one per node, is node.py's business; its clients need only its
`ServerEndpoint`.
"""

from __future__ import annotations

import importlib.metadata
import os

from pydantic import BaseModel

from ..base import LLMUnavailable, check_model_request
from .model import ENGINE_PACKAGE, INSTALL_HINT, model_path
from .options import LocalOptions
from .prompt_states import prepare_prefix_cache


class ServerEndpoint(BaseModel):
    """Where a running server listens and where it keeps saved prompt states: what its clients must know."""

    address: str  # http://127.0.0.1:PORT
    prefix_cache: str | None  # the directory the server saves and restores slot states in (on this node); None: none
    prefix_key: str  # what the saved states depend on besides the prompt: the model file, the engine, the cache layout


class LocalServer:
    """llama.cpp's server in this process: the model loaded once, `parallel` slots batched together.

    It listens on 127.0.0.1 on a free port; the process that made it keeps it until it exits.
    """

    def __init__(self, model: str | None, options: LocalOptions, parallel: int) -> None:
        try:
            import xllamacpp
        except ImportError:
            raise LLMUnavailable(f"local backend: xllamacpp is not installed; {INSTALL_HINT}") from None
        check_model_request("local")
        path = model_path(model)
        threads = options.n_threads or len(os.sched_getaffinity(0))
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_parallel = parallel
        params.n_ctx = options.n_ctx * parallel
        # One context cache shared by the slots. Split into a cache per slot, llama.cpp batches only
        # requests in adjacent slots (slots 0, 2, 5, 7 decoded one after another: 100-150 ms a step
        # for 4 agents against 60-70 in slots 0-3); shared, any requests batch, and one may use more
        # than its share while others use less.
        params.kv_unified = True
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.sampling.seed = options.seed
        params.cache_ram_mib = 0  # no prompt cache in RAM beyond the slots' own (it would grow to 8 GiB)
        params.fit_params = False  # keep n_ctx as asked instead of shrinking it to fit
        params.warmup = False
        params.verbosity = 0
        prefix_cache = prepare_prefix_cache()
        if prefix_cache is not None:
            params.slot_save_path = f"{prefix_cache}/"  # the server joins it to file names as text
        try:
            self._server = xllamacpp.Server(params)
        except Exception as error:  # xllamacpp raises RuntimeError or ValueError for a model it cannot load
            raise LLMUnavailable(f"local backend: cannot load {path}: {error}") from None
        stat = path.stat()
        self.endpoint = ServerEndpoint(
            address=self._server.listening_address,
            prefix_cache=str(prefix_cache) if prefix_cache is not None else None,
            # a state saved from a cache per slot does not restore into a shared one (seen: HTTP 400)
            prefix_key=f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:xllamacpp {importlib.metadata.version(ENGINE_PACKAGE)}:kv_unified",
        )
