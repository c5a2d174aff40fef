"""What `--llm local` accepts (`LLMConfig.options`): the server's threads and context, and sampling."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..base import LLMConfig, parse_options


class LocalOptions(BaseModel):
    """What `--llm local` accepts in config.options; defaults keep the small model from running on."""

    model_config = ConfigDict(extra="forbid")

    # Every core by default: the parallel slots decode in one batch per step, and on the quiet 2-core
    # machine 2 threads gave 1.5-1.8 x the tokens per second of 1 (benchmarks/local_engines.py). On a
    # machine busy with other work, 1 thread is steadier: llama.cpp's threads wait for each other.
    n_threads: int | None = Field(default=None, ge=1, description="the server's threads (default: every core this process may use)")
    n_ctx: int = Field(
        default=4096,
        ge=256,
        description="context cache of each parallel slot, in tokens (prompt + answer); the slots share theirs, so one request may use more",
    )
    max_tokens: int = Field(default=384, ge=1, description="answer length when the request sets none")
    # No repeat penalty by default: it counts the last 64 tokens, the prompt's task line among them,
    # and at 1.15 the default model avoided its own subject's name ("The database was developed..."
    # for "Research MySQL"): 39/49 answers named their subject, 46/49 with DRY instead
    # (benchmarks/quality.py). DRY penalises only extending a run of tokens already seen, so it breaks
    # loops and copied runs but lets an answer name its subject.
    repeat_penalty: float = Field(default=1.0, ge=1.0, description="above 1 penalises every token of the last 64, the prompt's included")
    dry_multiplier: float = Field(default=0.8, ge=0.0, description="DRY: penalises extending a run of tokens already seen (0 turns it off)")
    temperature: float = Field(default=0.2, ge=0.0)
    seed: int = Field(default=0, description="sampling seed")


def options_of(config: LLMConfig) -> LocalOptions:
    """The backend's options, or one ConfigError line naming the bad one."""
    return parse_options("local", LocalOptions, config.options)
