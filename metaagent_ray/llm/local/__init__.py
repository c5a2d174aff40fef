"""The `local` backend: a GGUF model served by llama.cpp's own server, in-process (xllamacpp).

No external server and no network: the default model, Gemma 3 270M (Q4_K_M, ~253 MB), ships as a
pip package and is assembled once into a cache file. One server per node holds the weights once and
answers `parallel` requests at a time, batching their tokens into shared decode steps (llama.cpp's
continuous batching); each parallel slot adds its share of one context (KV) cache. One concern a
module:

- `options.py`: what `--llm local` accepts;
- `model.py`: the model file, the facts its GGUF metadata gives (`gguf_metadata.py` reads and caches
  it) and the footprint the slot count is made from;
- `server.py`: llama.cpp's server in this process; `prompt_states.py`: the shared prompt states it
  saves and restores;
- `client.py`: `LocalLLM`, a cheap client of a server it is told how to find, and what it sends;
- `node.py`: the Ray actor that holds one server per node, and the factory the `local` entry point
  names. Only it imports Ray, so this package's names come without it.
"""

from .client import LocalLLM
from .model import INSTALL_HINT, default_model_file, local_backend_available
from .options import LocalOptions
from .server import LocalServer, ServerEndpoint

__all__ = ["INSTALL_HINT", "LocalLLM", "LocalOptions", "LocalServer", "ServerEndpoint", "default_model_file", "local_backend_available"]
