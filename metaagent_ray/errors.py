"""Errors a user can cause and fix: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class MetaAgentError(Exception):
    """A problem with the user's input or set-up, described in one actionable line."""

    exit_code = 2


class PlanError(MetaAgentError):
    """A plan file or a plan given to the API is unusable."""


class ConfigError(MetaAgentError):
    """An option or its value is unusable."""
