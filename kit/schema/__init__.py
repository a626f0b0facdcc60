"""The declared schema of every setting: one pydantic model per config group.

Each command checks its resolved config once, before any work (:func:`check`, called by
:func:`kit.config.load_config` and :func:`kit.config.train_settings`): a value of the wrong
type, out of range or not among the choices stops it with one line naming the key, the value
and what is allowed. The models hold no defaults: those live in ``kit/conf/<group>.yaml``,
and a test loads every YAML file through its model, so that neither can have a key the other
lacks. ``./run.sh config [GROUP]`` prints the tables (:func:`describe`).
"""
from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from kit.schema.base import Group
from kit.schema.stages import Blend, Clean, Folds, Patches, Report, Submit, Tune
from kit.schema.training import Augment, Features, Train
from kit.utils import KitError

# group -> model; train holds augment and features as sections (kit.config.TRAIN_SECTIONS).
GROUPS: dict[str, type[Group]] = {
    "train": Train, "augment": Augment, "features": Features, "clean": Clean,
    "patches": Patches, "folds": Folds, "blend": Blend, "tune": Tune, "submit": Submit,
    "report": Report,
}


def check(group: str, cfg: dict, source: str | None = None) -> dict:
    """``cfg`` unchanged when every key of ``group`` is valid, else a one-line KitError.

    The values are checked, never converted: the stages (and every cache key hashed from the
    config) see exactly what the YAML and the overrides gave.
    """
    try:
        GROUPS[group].model_validate(cfg)
    except ValidationError as err:
        raise KitError(explain(group, err, source)) from None
    return cfg


def explain(group: str, err: ValidationError, source: str | None = None) -> str:
    """One line for every problem of ``err``: ``group: key = value: what is allowed``."""
    model = GROUPS[group]
    parts, missing, seen = [], [], set()
    for e in err.errors():
        loc = _key_path(model, e["loc"])
        dotted = ".".join(loc)
        if dotted in seen:  # a union reports each of its branches: one line per key
            continue
        seen.add(dotted)
        if e["type"] == "missing":
            missing.append(dotted)
        elif e["type"] == "extra_forbidden":
            parts.append(f"{dotted}: no such key ({_known(model, loc[:-1])})")
        elif e["type"] == "value_error":  # our own validators say what is allowed
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{dotted} = {e['input']!r}: {msg}" if dotted else msg)
        else:
            parts.append(f"{dotted} = {e['input']!r} is not allowed: {allowed(model, loc)}")
    if missing:
        parts.append(f"{', '.join(missing)}: missing (give every key of kit/conf/{group}.yaml)")
    where = f" ({source})" if source else ""
    return f"{group}{where}: " + "; ".join(dict.fromkeys(parts))


def _key_path(model, loc) -> list[str]:
    """The setting's keys in a pydantic error location, without what pydantic adds after the
    key (the branch of a union: "literal['auto']", "constrained-int", list indices)."""
    out, node = [], model
    for part in loc:
        if node is None:
            break
        out.append(str(part))
        info = node.model_fields.get(str(part))
        sub = info.annotation if info is not None else None
        node = sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None
    return out


def _known(model: type[BaseModel], loc: list[str]) -> str:
    node = _model_at(model, loc)
    if node is None:
        return "this section takes no keys"
    return "known keys: " + ", ".join(node.model_fields)


def _model_at(model, loc):
    for part in loc:
        if part not in model.model_fields:
            return None
        sub = model.model_fields[part].annotation
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return None
        model = sub
    return model


def field_at(model: type[BaseModel], loc: list[str]):
    """The pydantic FieldInfo of dotted location ``loc``, or None."""
    parent = _model_at(model, loc[:-1])
    if parent is None or not loc or loc[-1] not in parent.model_fields:
        return None
    return parent.model_fields[loc[-1]]


def allowed(model: type[BaseModel], loc: list[str]) -> str:
    """What the key at ``loc`` takes, in words (``one of a, b``, ``an integer >= 1``)."""
    info = field_at(model, loc)
    if info is None:
        return "see the defaults in kit/conf/"
    text = words(info.annotation, info.metadata)
    return f"{text} ({info.description})" if info.description else text


def words(annotation, metadata=()) -> str:
    """The allowed values of a type annotation, in words."""
    bounds = _bounds(metadata)
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(annotation)
        return words(base, list(meta) + list(metadata))
    if origin is typing.Literal:
        args = typing.get_args(annotation)
        return _show(args[0]) if len(args) == 1 else "one of " + ", ".join(map(_show, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(words(a) for a in typing.get_args(annotation)))
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        inner = words(args[0]) if args else ""
        if inner.startswith("one of "):
            return "a list of " + inner.removeprefix("one of ")
        return {"": "a list", "a string": "a list of strings"}.get(inner, f"a list ({inner})")
    if origin is dict:
        return "a mapping"
    name = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(annotation)
    if annotation is Any:
        return "see the description"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a section: " + ", ".join(annotation.model_fields)
    return (name or getattr(annotation, "__name__", str(annotation))) + bounds


def _bounds(metadata) -> str:
    out = []
    for m in metadata:
        if hasattr(m, "metadata"):  # a pydantic Field(ge=...) inside Annotated
            inner = _bounds(m.metadata)
            out += [inner.strip()] if inner else []
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(m, attr, None)
            if value is not None:
                out.append(f"{sign} {value}")
    return (" " + " and ".join(out)) if out else ""


def _show(value) -> str:
    return "false" if value is False else "true" if value is True else str(value)


def describe(group: str, defaults: dict) -> list[tuple[str, Any, str, str]]:
    """``(dotted key, default, allowed values, description)`` for every key of ``group``."""
    rows = []

    def walk(model, node, prefix):
        for name, info in model.model_fields.items():
            sub = info.annotation
            value = node.get(name) if isinstance(node, dict) else None
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                walk(sub, value, prefix + name + ".")
            else:
                rows.append((prefix + name, value, words(sub, info.metadata),
                             info.description or ""))

    walk(GROUPS[group], defaults, "")
    return rows


def path_free(dotted: str, group: str = "train") -> bool:
    """Whether a training setting means the same on both training paths (declared by
    ``key(..., path_free=...)``; the innermost declaration wins, undeclared keys are bound)."""
    model, free = GROUPS[group], False
    for part in dotted.split("."):
        info = model.model_fields.get(part) if model is not None else None
        if info is None:
            break
        marker = (info.json_schema_extra or {}).get("path_free")
        free = free if marker is None else marker
        sub = info.annotation
        model = sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None
    return free
