"""The competition a run serves: classes, file layout, metric and patient groups, from a task file.

A task file is a small YAML mapping (``docs/tasks.md`` explains every key)::

    name: bach-like
    classes: [Normal, Benign, InSitu, Invasive]   # this order = probability columns
    labels: {file: train.csv, id: case, label: tissue, group: patient_id}
    images: {train: "train/{id}.png", test: "test/{id}.png"}
    masks: null
    id_pattern: null
    metric: balanced_accuracy
    submission: {id: case, label: tissue}
    junk: []
    kaggle: null

:func:`load_task` finds it (``--task FILE`` or a built-in task's name, else ``task.yaml`` at
the data root, else the built-in AN2DL task) and checks it; a bad file stops with one line
per problem, ``<task file>: <key>: <what is wrong>; <the fix>``. This module is shared by
every layer: it imports none of them, and reads no data (``kit.data.dataset`` lists the files
a task describes).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import string
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag,
                      ValidationError, field_validator, model_validator)

from kit.metrics import METRICS
from kit.utils import KitError, read_yaml

TASKS_DIR = Path(__file__).parent / "conf" / "tasks"
DEFAULT_TASK = "an2dl2526c2v2"  # the built-in task when nothing else names one
TASK_FILE = "task.yaml"  # looked for at the root of the data folder
JUNK_DETECTORS = ("green", "cartoon")  # the clean stage's detectors (kit/conf/clean.yaml)
SPLITS = ("train", "test")
# Fields every path pattern may use besides id_pattern's named groups; label only in the
# folders layout's training patterns, where the class is the image's folder.
ID, LABEL = "id", "label"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _nonempty(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"is empty; give the {what}")
    return value


class CsvLabels(_Strict):
    """Training labels in a CSV file under the data folder, one row per image."""

    file: str
    id: str
    label: str
    group: str | None = None

    @field_validator("file")
    @classmethod
    def _file(cls, v: str) -> str:
        return _relative(_nonempty(v, "labels file's path under the data folder"),
                         "the labels file's path under the data folder")

    @field_validator("id", "label", "group")
    @classmethod
    def _column(cls, v):
        return v if v is None else _nonempty(v, "column name as in the file's header")

    @model_validator(mode="after")
    def _distinct(self):
        cols = [c for c in (self.id, self.label, self.group) if c is not None]
        if len(set(cols)) < len(cols):
            raise ValueError(f"labels: the id, label and group columns must differ (got "
                             f"{', '.join(cols)}); name each column once")
        return self


class FolderLabels(_Strict):
    """The class of a training image is the name of its folder (the ImageFolder layout)."""

    from_: Literal["folders"] = Field(alias="from")


def _labels_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return "folders" if "from" in value else "csv"
    if isinstance(value, (CsvLabels, FolderLabels)):
        return "folders" if isinstance(value, FolderLabels) else "csv"
    return None


Labels = Annotated[Annotated[CsvLabels, Tag("csv")] | Annotated[FolderLabels, Tag("folders")],
                   Discriminator(_labels_kind, custom_error_type="labels_form",
                                 custom_error_message="expected a mapping: {file, id, label} "
                                                      "(group optional) or {from: folders}")]


class SplitPaths(_Strict):
    """One path pattern per split, relative to the data folder."""

    train: str
    test: str

    @field_validator("train", "test")
    @classmethod
    def _pattern(cls, v: str) -> str:
        return _relative(_nonempty(v, "path pattern, e.g. train/{id}.png"),
                         "a pattern under the data folder, e.g. train/{id}.png")


class SubmissionColumns(_Strict):
    """The submission CSV's header: the id column and the predicted-class column."""

    id: str
    label: str

    @field_validator("id", "label")
    @classmethod
    def _column(cls, v: str) -> str:
        return _nonempty(v, "column name of the competition's sample submission")

    @model_validator(mode="after")
    def _distinct(self):
        if self.id == self.label:
            raise ValueError(f"submission: id and label are both {self.id!r}; the two columns "
                             "need different names (see the competition's sample submission)")
        return self


def _relative(path: str, what: str) -> str:
    parts = path.split("/")
    if path.startswith(("/", "~")) or "\\" in path or ".." in parts or re.match(r"^[A-Za-z]:", path):
        raise ValueError(f"{path!r} is not a path under the data folder; give {what} "
                         "(forward slashes, no .. or leading /)")
    return path


class Task(_Strict):
    """A competition's task: what the stages need to know about its data and its score.

    Build it with :func:`load_task` (a file, a built-in name, or the data folder's
    ``task.yaml``); ``Task.model_validate(mapping)`` checks the same rules but raises
    pydantic's error, which :func:`parse_task` turns into the kit's one-line form.
    """

    name: str
    classes: tuple[str, ...]
    labels: Labels
    images: SplitPaths
    masks: SplitPaths | None = None
    id_pattern: str | None = None
    metric: str
    submission: SubmissionColumns
    junk: tuple[str, ...] = ()
    kaggle: str | None = None

    _source: Path | None = PrivateAttr(default=None)
    _builtin: bool = PrivateAttr(default=False)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _nonempty(v, "task's name, e.g. the competition's slug")

    @field_validator("classes", mode="before")
    @classmethod
    def _numbers_are_text(cls, v):
        # Ordinal grades are often written 0, 1, 2: the labels file holds them as text.
        if isinstance(v, (list, tuple)):
            return [str(c) if isinstance(c, int) and not isinstance(c, bool) else c for c in v]
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) < 2:
            raise ValueError(f"{len(v)} class(es) given; list at least 2 class names, in the "
                             "order of the probability columns")
        for c in v:
            if not c.strip() or c != c.strip():
                raise ValueError(f"class {c!r} is empty or has leading/trailing spaces; write "
                                 "each class exactly as in the labels")
        seen: dict[str, str] = {}
        for c in v:
            key = squash(c)
            if key in seen:
                same = "is listed twice" if seen[key] == c else f"and {seen[key]!r} differ only in case or spacing"
                raise ValueError(f"class {c!r} {same}; list each class once")
            seen[key] = c
        return v

    @field_validator("id_pattern")
    @classmethod
    def _id_pattern(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            rx = re.compile(v)
        except re.error as exc:
            raise ValueError(f"{v!r} is not a valid regular expression ({exc}); fix it (Python "
                             r"re syntax, e.g. 'img_(?P<n>\d+)\.png')") from None
        reserved = sorted({ID, LABEL} & set(rx.groupindex))
        if reserved:
            raise ValueError(f"named group {reserved[0]!r} is reserved for the path patterns; "
                             "rename the group")
        return v

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"{v!r} is not a known metric{_did_you_mean(v, METRICS)}; use one "
                             f"of {', '.join(METRICS)}")
        return v

    @field_validator("junk")
    @classmethod
    def _junk(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if name not in JUNK_DETECTORS:
                raise ValueError(f"{name!r} is not a junk detector{_did_you_mean(name, JUNK_DETECTORS)}; "
                                 f"use [] or some of {', '.join(JUNK_DETECTORS)}")
        if len(set(v)) < len(v):
            raise ValueError(f"{list(v)} names a detector twice; list each once")
        return v

    @field_validator("kaggle")
    @classmethod
    def _kaggle(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"{v!r} is not a competition slug; give the part of the "
                             "competition's URL after /competitions/ (or null)")
        return v

    @model_validator(mode="after")
    def _patterns(self):
        problems = []
        groups = set(self.id_groups)
        for key, pattern in self.patterns().items():
            kind, split = key.split(".")
            try:
                fields = pattern_fields(pattern)
            except ValueError as exc:
                problems.append(f"{key}: {exc}")
                continue
            allowed = {ID} | groups | ({LABEL} if self.layout == "folders" and split == "train"
                                       else set())
            unknown = [f for f in fields if f not in allowed]
            if unknown:
                why = (" ({label} is the class folder of the folders layout's training images)"
                       if LABEL in unknown else "")
                problems.append(f"{key}: {pattern!r} uses {{{unknown[0]}}}{why}; use "
                                f"{', '.join('{' + f + '}' for f in sorted(allowed))} (named "
                                "groups of id_pattern are fields too)")
            elif kind == "images" and ID not in fields:
                problems.append(f"{key}: {pattern!r} has no {{id}}; the image file names give "
                                "the ids, e.g. train/{id}.png")
            elif not fields:
                problems.append(f"{key}: {pattern!r} has no field; name each image's mask with "
                                "{id} or a named group of id_pattern, e.g. masks/{id}.png")
        if self.layout == "folders" and LABEL not in _safe_fields(self.images.train):
            problems.append(f"images.train: {self.images.train!r} has no {{label}} while labels "
                            "is {from: folders}; put the class folder in it, e.g. "
                            "train/{label}/{id}.png")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # --------------------------------------------------------------------- what stages use
    @property
    def layout(self) -> str:
        """``folders`` (the class is the image's folder) or ``csv`` (a labels file)."""
        return "folders" if isinstance(self.labels, FolderLabels) else "csv"

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    @property
    def has_groups(self) -> bool:
        """Whether the labels file names a group (patient) per image."""
        return isinstance(self.labels, CsvLabels) and self.labels.group is not None

    @property
    def submission_columns(self) -> tuple[str, str]:
        """The submission CSV's header: (id column, label column)."""
        return self.submission.id, self.submission.label

    @property
    def prob_columns(self) -> list[str]:
        """``p_<class>`` per class, in class order: the probability columns of OOF/test files."""
        return [f"p_{c}" for c in self.classes]

    @property
    def id_groups(self) -> tuple[str, ...]:
        """Named groups of ``id_pattern``, in pattern order (path-pattern fields)."""
        return tuple(_id_regex(self.id_pattern).groupindex) if self.id_pattern else ()

    @property
    def source(self) -> Path | None:
        """The task file it was read from (None: built from a mapping)."""
        return self._source

    @property
    def builtin(self) -> bool:
        """Whether it is one of the kit's own tasks (``kit/conf/tasks/``)."""
        return self._builtin

    def patterns(self) -> dict[str, str]:
        """Every path pattern by its key: ``images.train``, ``images.test``, ``masks.*``."""
        out = {f"images.{s}": getattr(self.images, s) for s in SPLITS}
        if self.masks is not None:
            out.update({f"masks.{s}": getattr(self.masks, s) for s in SPLITS})
        return out

    def id_fields(self, sample_id: str) -> dict[str, str] | None:
        """The named groups of ``id_pattern`` in ``sample_id`` (``{}`` without a pattern);
        None when the id does not match it (not an id of this task)."""
        if not self.id_pattern:
            return {}
        m = _id_regex(self.id_pattern).fullmatch(sample_id)
        return None if m is None else {k: v for k, v in m.groupdict().items()}

    def path(self, kind: str, split: str, sample_id: str, label: str | None = None) -> str | None:
        """The relative path of ``kind`` (images | masks) of one sample, or None when the id
        does not match ``id_pattern`` and the pattern needs its groups."""
        pattern = getattr(getattr(self, kind), split)
        fields = self.id_fields(sample_id)
        needed = set(pattern_fields(pattern))
        if fields is None:
            if needed - {ID, LABEL}:
                return None
            fields = {}
        if LABEL in needed and label is None:
            return None
        return pattern.format(**fields, **{ID: sample_id, LABEL: label})

    def sort_key(self, sample_id: str) -> tuple:
        """Sample order: ``id_pattern``'s groups in pattern order, then the id."""
        fields = self.id_fields(sample_id) or {}
        return (tuple(fields.get(g) or "" for g in self.id_groups), sample_id)

    def id_from_fields(self, fields: dict[str, str]) -> str | None:
        """The id whose ``id_pattern`` groups are ``fields`` (a mask file's, to name the image
        it lacks), when the pattern is literal text around its groups; else None."""
        if ID in fields:
            return fields[ID]
        if not self.id_pattern:
            return None
        text = _fill_groups(self.id_pattern, fields)
        if text is None or self.id_fields(text) != {k: fields.get(k) for k in self.id_groups}:
            return None
        return text

    def cite(self, key: str) -> str:
        """`` (<key> in <task file>)`` after a data problem that key explains; nothing for a
        built-in task, whose data, not its file, is to fix."""
        if self.builtin:
            return ""
        return f" ({key} in {self.source or 'the task'})"

    # --------------------------------------------------------------------- identity
    def to_dict(self) -> dict:
        """The task as plain data, keys as in the file (JSON- and YAML-ready)."""
        return self.model_dump(mode="json", by_alias=True)

    @property
    def fingerprint(self) -> str:
        """sha256 of the task's content (not of where it was read from)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def __eq__(self, other) -> bool:
        return isinstance(other, Task) and self.fingerprint == other.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        where = f", source={str(self._source)!r}" if self._source else ""
        return f"Task(name={self.name!r}, classes={list(self.classes)!r}, metric={self.metric!r}{where})"


# ------------------------------------------------------------------------- path patterns
@cache
def pattern_fields(pattern: str) -> tuple[str, ...]:
    """The ``{fields}`` of a path pattern, each once, in order of appearance.

    Raises ValueError for a field that is not a plain name (``{}``, ``{0}``, ``{a.b}``,
    ``{id:>4}``) or an unbalanced brace.
    """
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as exc:
        raise ValueError(f"{pattern!r} is not a valid pattern ({exc}); write fields as {{id}} "
                         "and a literal brace as {{ or }}") from None
    out: list[str] = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"{pattern!r} has field {shown}; fields are plain names such as "
                             "{id}, with no format spec")
        if field not in out:
            out.append(field)
    return tuple(out)


def _safe_fields(pattern: str) -> tuple[str, ...]:
    try:
        return pattern_fields(pattern)
    except ValueError:
        return ()


@cache
def pattern_regex(pattern: str) -> re.Pattern:
    """A regex matching the relative paths ``pattern`` describes; each field a named group
    of one path component (a repeated field must repeat its value)."""
    out, seen = [], set()
    for literal, field, _, _ in string.Formatter().parse(pattern):
        out.append(re.escape(literal))
        if field is None:
            continue
        out.append(f"(?P={field})" if field in seen else f"(?P<{field}>[^/]+)")
        seen.add(field)
    return re.compile("".join(out))


def pattern_glob(pattern: str) -> str:
    """A glob finding the candidate files of ``pattern`` (each field one ``*``)."""
    import glob

    return "".join(glob.escape(literal) + ("*" if field is not None else "")
                   for literal, field, _, _ in string.Formatter().parse(pattern))


def pattern_folder(pattern: str) -> str:
    """The fixed folder part of a pattern before its first field (``train/{label}/{id}.png``
    -> ``train``; ``{id}.png`` -> ``""``)."""
    head = ""
    for literal, field, _, _ in string.Formatter().parse(pattern):
        head += literal
        if field is not None:
            break
    else:
        head = head.rsplit("/", 1)[0] + "/" if "/" in head else ""  # no field: a fixed file
    return head.rsplit("/", 1)[0] if "/" in head else ""


@cache
def _id_regex(id_pattern: str) -> re.Pattern:
    return re.compile(id_pattern)


def _fill_groups(id_pattern: str, fields: dict[str, str]) -> str | None:
    """``id_pattern`` with each named group replaced by its value and escapes undone, when
    the rest is literal text; None when it is not (``a|b``, ``\\d+`` outside a group, ...)."""
    out, i, n = [], 0, len(id_pattern)
    while i < n:
        if id_pattern.startswith("(?P<", i):
            end = id_pattern.index(">", i)
            name = id_pattern[i + 4:end]
            depth, j = 1, end + 1
            while j < n and depth:
                if id_pattern[j] == "\\":
                    j += 2
                    continue
                depth += {"(": 1, ")": -1}.get(id_pattern[j], 0)
                j += 1
            if depth or name not in fields:
                return None
            out.append(fields[name])
            i = j
        elif id_pattern[i] == "\\" and i + 1 < n and not id_pattern[i + 1].isalnum():
            out.append(id_pattern[i + 1])
            i += 2
        elif id_pattern[i] in ".^$*+?{}[]|()\\":
            if id_pattern[i] in "^$" and (i == 0 or i == n - 1):
                i += 1  # anchors at the ends add no text
                continue
            return None
        else:
            out.append(id_pattern[i])
            i += 1
    return "".join(out)


def squash(text: str) -> str:
    """``text`` without spaces, case-folded: labels that differ only in those mean one class."""
    return "".join(text.split()).casefold()


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ------------------------------------------------------------------------- loading
def builtin_tasks() -> list[str]:
    """Names of the kit's own tasks (``kit/conf/tasks/<name>.yaml``)."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


@cache
def default_task() -> Task:
    """The built-in AN2DL task (``kit/conf/tasks/an2dl2526c2v2.yaml``), read once."""
    return read_task(TASKS_DIR / f"{DEFAULT_TASK}.yaml", builtin=True)


def load_task(spec=None, data_root=None) -> Task:
    """The task a command runs on.

    Found in this order: ``spec`` (a :class:`Task`, a task file's path, or a built-in task's
    name); ``task.yaml`` at the root of ``data_root`` (or of its only sub-folder holding
    one, as Kaggle mounts a dataset one level down); the built-in AN2DL task.

    Parameters
    ----------
    spec : Task, str, path or None
        ``None`` or ``"auto"``: look in ``data_root``, then the default.
    data_root : path, optional
        The data folder (``--data``).

    Raises
    ------
    KitError
        One line per problem of the file, ``<task file>: <key>: <what is wrong>; <the fix>``.
    """
    if isinstance(spec, Task):
        return spec
    if spec is not None and str(spec) != "auto":
        path = Path(spec).expanduser()
        if path.is_file():
            return read_task(path)
        if str(spec) == DEFAULT_TASK:
            return default_task()
        if str(spec) in builtin_tasks():
            return read_task(TASKS_DIR / f"{spec}.yaml", builtin=True)
        raise KitError(f"--task {spec}: no such task file and no built-in task of that name; "
                       f"give a task file's path or one of {', '.join(builtin_tasks())} "
                       "(docs/tasks.md)")
    found = find_task_file(data_root) if data_root is not None else None
    if found is not None:
        return read_task(found)
    return default_task()


def find_task_file(data_root) -> Path | None:
    """``task.yaml`` at ``data_root``, else in its only sub-folder holding one, else None."""
    root = Path(data_root).expanduser()
    if (root / TASK_FILE).is_file():
        return root / TASK_FILE
    if not root.is_dir():
        return None
    nested = [p / TASK_FILE for p in sorted(root.iterdir())
              if p.is_dir() and (p / TASK_FILE).is_file()]
    return nested[0] if len(nested) == 1 else None


def read_task(path, builtin: bool = False) -> Task:
    """The task of one YAML file, checked (see :func:`parse_task`)."""
    path = Path(path)
    if not path.is_file():
        raise KitError(f"{path}: task file not found; give an existing file (docs/tasks.md)")
    return parse_task(read_yaml(path), path, builtin=builtin)


def parse_task(data: dict, source=None, builtin: bool = False) -> Task:
    """A :class:`Task` from a mapping; every problem one line naming ``source`` and the key.

    Raises
    ------
    KitError
        ``<source>: <key>: <what is wrong>; <the fix>``; several problems: a summary line
        and one line each.
    """
    where = str(source) if source is not None else "task"
    if not isinstance(data, dict):
        raise KitError(f"{where}: expected a mapping of task keys at the top level; see "
                       "docs/tasks.md")
    try:
        task = Task.model_validate(data)
    except ValidationError as exc:
        lines = [f"{where}: {line}" for line in format_errors(exc)]
        if len(lines) == 1:
            raise KitError(lines[0]) from None
        raise KitError(f"{where}: {len(lines)} problems in the task file", lines) from None
    task._source = Path(source) if source is not None else None
    task._builtin = builtin
    return task


# ------------------------------------------------------------------------- error lines
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
    "labels": ", e.g. labels: {file: train.csv, id: case, label: tissue} or labels: {from: folders}",
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


class Data(os.PathLike):
    """What every stage takes as ``data``: the dataset root and the task that reads it.

    It is a path-like object (``Path(data)`` and ``open``-style calls see the root), so code
    that only needs the folder keeps working; stages that need the classes, the metric or the
    layout read ``data.task``. Commands build it once (:func:`as_data`) from ``--data`` and
    ``--task``.
    """

    __slots__ = ("root", "task")

    def __init__(self, root, task: Task):
        self.root = Path(root)
        self.task = task

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"Data({str(self.root)!r}, task={self.task.name!r})"

    def __truediv__(self, other) -> Path:
        return self.root / other

    def __eq__(self, other) -> bool:
        return (isinstance(other, Data) and self.root == other.root
                and self.task == other.task)

    def __hash__(self) -> int:
        return hash((self.root, self.task))


def as_data(data, task=None) -> Data | None:
    """``data`` as a :class:`Data`: kept when it is one, else the root with the task found
    for it (``task``, then ``task.yaml`` in the folder, then the built-in one). None stays
    None (a stage that can run without a dataset)."""
    if data is None or isinstance(data, Data):
        return data
    # a loaded kit.data.dataset.Dataset too (by its root; a Path's .root is its anchor, "/")
    root = Path(data if isinstance(data, (str, os.PathLike)) else data.root)
    return Data(root, load_task(task if task is not None else getattr(data, "task", None), root))


def task_of(data) -> Task:
    """The task of ``data`` (a :class:`Data`, a dataset root, or None: the built-in task)."""
    if data is None:
        return default_task()
    return as_data(data).task
