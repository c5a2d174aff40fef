"""How a run ends early: the exceptions that carry its saved record and its exit code to the caller."""

from __future__ import annotations

from .errors import MetaAgentError
from .record import RunRecord


class RunStopped(MetaAgentError):
    """The run ended before its agents did; what finished is saved in `record` (and its run directory)."""

    def __init__(self, message: str, record: RunRecord, exit_code: int) -> None:
        super().__init__(message)
        self.record = record
        self.exit_code = exit_code


class RunInterrupted(RunStopped):
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP) ended the run: status `interrupted`, exit 128 + the signal."""


class RunBroken(RunStopped):
    """A Ray process the run needs (its hub actor, a raylet) died, or every node with its LLM slots: status `failed`, exit 1."""


class PlanningInterrupted(MetaAgentError):
    """A stop signal arrived before the plan's run began (mostly while the coordinator wrote it): there is no run to save."""

    def __init__(self, code: int, planned: bool = False) -> None:
        if planned:  # a plan already whole, interrupted while the executors started
            super().__init__("interrupted before the plan's agents started; nothing was saved")
        else:
            super().__init__("interrupted while the coordinator planned; nothing was saved (no plan yet)")
        self.exit_code = code
