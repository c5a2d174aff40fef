"""A user's own llama.cpp server, for model tests and benchmarks: xllamacpp's `Server` serving the GGUF
the `local` extra ships, on 127.0.0.1, as `llama-server -m MODEL --alias NAME --parallel N` would.

It is no part of any run: the `openai` backend reaches it over HTTP as it would any server the user
runs, and it runs in a process of its own, as such a server does:

    python -m tests.llama_server --parallel 4 --alias gemma   # prints its /v1 URL, serves until SIGTERM
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Sequence

CONTEXT_PER_SLOT = 4096  # tokens, as the local backend's n_ctx default
READY_TIMEOUT_S = 120.0
ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def serving(parallel: int = 4, alias: str = "gemma") -> Iterator[str]:
    """A server process for the block: yields its OpenAI base URL (http://127.0.0.1:PORT/v1); ends it after."""
    command = [sys.executable, "-m", "tests.llama_server", "--parallel", str(parallel), "--alias", alias]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()  # the URL once it serves; "" if it died first
        if not line.startswith("http://"):
            raise RuntimeError(f"the llama.cpp server did not start (exit status {process.wait(READY_TIMEOUT_S)})")
        yield line
    finally:
        process.terminate()
        process.wait(30)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", type=int, default=4, help="requests it decodes at once (llama-server's --parallel)")
    parser.add_argument("--alias", default="gemma", help="the model name it serves (llama-server's --alias)")
    args = parser.parse_args(argv)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # only sigwait below receives them

    import xllamacpp

    from metaagent_ray.llm.local import default_model_file

    params = xllamacpp.CommonParams()
    params.model.path = str(default_model_file())
    params.model_alias = {args.alias}
    params.n_parallel = args.parallel
    params.n_ctx = CONTEXT_PER_SLOT * args.parallel
    server = xllamacpp.Server(params)
    print(f"{server.listening_address}/v1", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    del server


if __name__ == "__main__":
    main()
