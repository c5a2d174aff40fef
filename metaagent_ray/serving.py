"""What `--serve-llm CONFIG.yaml` says: the Ray Serve application a run's agents call (`ServeLLMSpec`).

Apart from serve_llm.py, which deploys it, so that the settings (and everything that imports them)
need neither Ray Serve nor FastAPI; only a run that serves its model through Ray Serve does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError
from .llm.local.options import LocalOptions


class ServeLLMSpec(BaseModel):
    """What `--serve-llm CONFIG.yaml` holds: the Serve application the run's agents call."""

    model_config = ConfigDict(extra="forbid")

    name: str = "metaagent-llm"  # the Serve application; one already running under this name is attached to, not replaced
    route_prefix: str = "/metaagent-llm"
    http_host: str = "127.0.0.1"  # Serve's HTTP proxy (on the head node), if this run starts Serve; 0.0.0.0 for agents on other nodes
    http_port: int = Field(default=8000, ge=1, le=65535)
    replicas: int = Field(default=2, ge=1)
    parallel: int = Field(default=4, ge=1)  # requests one replica decodes at once: llama.cpp's parallel slots
    cpus_per_replica: float = Field(default=1.0, ge=0)
    gpus_per_replica: float = Field(default=0.0, ge=0)  # 1: one replica per GPU; 0.5: two per GPU
    model: str | None = None  # a .gguf file on every node; None: the local backend's default model
    local: LocalOptions = Field(default_factory=LocalOptions)  # each replica's llama.cpp options: n_ctx, n_threads, and sampling
    router: Literal["prefix", "power_of_two"] = "prefix"
    # prefix routing gives way to Serve's power-of-two choice when the replicas' queues differ by more
    # than this; None: parallel - 1, so a prefix stays on its replica until that replica is full
    imbalanced_threshold: int | None = Field(default=None, ge=0)

    @classmethod
    def from_yaml(cls, path: Path) -> ServeLLMSpec:
        """The spec in a YAML file, or one ConfigError line saying what is wrong with it."""
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"--serve-llm {path}: {error}") from None
        try:
            return cls.model_validate(data or {})
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "file"
            raise ConfigError(f"--serve-llm {path}: {where}: {first['msg']}") from None

    @property
    def capacity(self) -> int:
        """The requests the replicas decode at once, once all run."""
        return self.replicas * self.parallel

    @property
    def load_threshold(self) -> int:
        """When prefix routing gives way to spreading the load (Ray's PrefixCacheAffinityRouter's `imbalanced_threshold`)."""
        return self.imbalanced_threshold if self.imbalanced_threshold is not None else self.parallel - 1
