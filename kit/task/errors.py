"""pydantic's validation errors of a task file as the kit's one-line form,
``<key>: <what is wrong>; <the fix>``."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from kit.metrics import METRICS
from kit.task.model import Task
from kit.task.patterns import _did_you_mean

_TAGS = {"csv", "folders"}


def format_errors(exc: ValidationError) -> list[str]:
    """pydantic's errors as ``<key>: <what is wrong>; <the fix>`` lines, one per problem."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = [p for i, p in enumerate(err["loc"])
               if not (p in _TAGS and i > 0 and err["loc"][i - 1] == "labels")]
        key = _key(loc)
        kind, msg, value = err["type"], err["msg"], err.get("input")
        if kind == "value_error":
            text = msg.removeprefix("Value error, ")
            for part in text.splitlines():
                # model-level checks name their key themselves
                lines.append(part if not key or part.startswith(f"{key}:") else f"{key}: {part}")
            continue
        if kind == "missing":
            lines.append(f"{key}: missing; add it{_EXAMPLES.get(key, '')}")
        elif kind == "extra_forbidden" and "folders" in err["loc"][:2]:
            lines.append(f"{key}: not a key of labels: {{from: folders}}, which reads the "
                         "classes from the folders; remove it, or remove `from` to read a "
                         "labels file")
        elif kind == "extra_forbidden":
            known = _known_keys(loc[:-1])
            lines.append(f"{key}: unknown key{_did_you_mean(loc[-1], known)}; the keys here "
                         f"are {', '.join(known)}")
        elif kind == "labels_form":
            lines.append(f"{key}: {msg} (got {value!r}); see docs/tasks.md")
        elif kind == "literal_error":
            lines.append(f"{key}: {value!r} is not allowed; use {err['ctx']['expected']}")
        elif kind in ("tuple_type", "list_type"):
            lines.append(f"{key}: expected a list (got {value!r}); write it as [a, b, ...]"
                         f"{_EXAMPLES.get(key, '')}")
        else:
            got = f" (got {value!r})" if not isinstance(value, dict) else " (got a mapping)"
            lines.append(f"{key}: {msg[0].lower() + msg[1:]}{got}; fix the value"
                         f"{_EXAMPLES.get(key, '')}")
    return lines


_EXAMPLES = {
    "name": ", e.g. name: my-competition",
    "classes": ", e.g. classes: [Normal, Benign, Invasive]",
    "labels": (", e.g. labels: {file: train.csv, id: case, label: tissue} or labels: "
               "{from: folders}"),
    "images": ', e.g. images: {train: "train/{id}.png", test: "test/{id}.png"}',
    "metric": f", one of {', '.join(METRICS)}",
    "submission": ", e.g. submission: {id: id, label: label} (the sample submission's header)",
}


def _key(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + ("from" if part == "from_" else str(part))
    return out


def _known_keys(parent) -> list[str]:
    model: Any = Task
    for part in parent:
        if isinstance(part, int) or model is None:
            return []
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)
                      and issubclass(a, BaseModel)]
        model = candidates[0] if len(candidates) == 1 else None
        if part == "labels":
            return ["file", "id", "label", "group (or {from: folders} alone)"]
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]
