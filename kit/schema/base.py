"""The base of every settings group: every key declared, none defaulted here (the YAML files
under ``kit/conf/`` hold the defaults; a key missing from either side fails a test)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Group(BaseModel):
    """A settings group or section: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=False)


def key(description: str, *, path_free: bool | None = None):
    """A required field with its one-line description.

    ``path_free`` (training settings): whether the key means the same on both training paths
    (pixels, cached embeddings), so that a value tuned on one carries to the other
    (:mod:`kit.training.params`); on a section it holds for its keys unless one says otherwise.
    """
    extra = None if path_free is None else {"path_free": path_free}
    return Field(description=description, json_schema_extra=extra)
