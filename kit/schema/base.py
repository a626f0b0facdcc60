"""The base of every settings group: every key declared, none defaulted here (the YAML files
under ``kit/conf/`` hold the defaults; a key missing from either side fails a test)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Group(BaseModel):
    """A settings group or section: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=False)


def key(description: str):
    """A required field with its one-line description."""
    return Field(description=description)
