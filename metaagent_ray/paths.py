"""Where an agent sits in a run's tree of plans.

A run's plan is the root's sub-plan: its agent 2 is at path "2", and agent 1 of the sub-plan agent 2
delegated to is at "2.1". The record, the events and the run directory's file names all say it so;
this type builds and reads that string in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import CoreSchema, core_schema


@dataclass(frozen=True, order=True)
class AgentPath:
    """The agent's index in each plan from the run's plan down; no steps is the run itself (its coordinator)."""

    steps: tuple[int, ...] = ()

    @classmethod
    def parse(cls, value: str | AgentPath) -> AgentPath:
        """"2.1" (or a path already) as a path; ValueError for anything else."""
        if isinstance(value, AgentPath):
            return value
        if value == "":
            return ROOT
        parts = value.split(".")
        if not all(part.isdigit() for part in parts):
            raise ValueError(f"not an agent path: {value!r} (agent indexes joined by dots, like 2.1)")
        return cls(tuple(int(part) for part in parts))

    def child(self, index: int) -> AgentPath:
        """Agent `index` of the plan this path's agent delegated to (of the run's plan, for the root)."""
        return AgentPath((*self.steps, index))

    @property
    def index(self) -> int:
        """The agent's index in its own plan."""
        return self.steps[-1]

    @property
    def parent(self) -> AgentPath:
        """The agent whose sub-plan holds this one; the root for the run's own agents."""
        return AgentPath(self.steps[:-1])

    @property
    def depth(self) -> int:
        """0 for an agent of the run's plan, 1 for one of its sub-plans, and so on."""
        return len(self.steps) - 1

    def __str__(self) -> str:
        return ".".join(str(step) for step in self.steps)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        """In records and their JSON: the string "2.1"."""
        return core_schema.no_info_plain_validator_function(
            cls.parse, json_schema_input_schema=core_schema.str_schema(), serialization=core_schema.to_string_ser_schema()
        )


ROOT = AgentPath()
