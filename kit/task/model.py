"""The task model: a task file's keys, each checked when the file is read (pydantic), and
what the stages read off a task (classes, layout, paths, submission columns, fingerprint)."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    field_validator,
    model_validator,
)

from kit.metrics import METRICS
from kit.task.patterns import (
    ID,
    LABEL,
    _did_you_mean,
    _fill_groups,
    _id_regex,
    _safe_fields,
    pattern_fields,
    squash,
)

JUNK_DETECTORS = ("green", "cartoon")  # the clean stage's detectors (kit/conf/clean.yaml)
SPLITS = ("train", "test")


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
    if (path.startswith(("/", "~")) or "\\" in path or ".." in parts
            or re.match(r"^[A-Za-z]:", path)):
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
    # The share of the test set Kaggle scores publicly (the rest ranks privately): what the
    # shake-up estimate splits by; None: not published, 0.3 assumed (kit.submission.shakeup).
    public_fraction: float | None = Field(default=None, gt=0, lt=1)

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
                same = ("is listed twice" if seen[key] == c
                        else f"and {seen[key]!r} differ only in case or spacing")
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
                raise ValueError(f"{name!r} is not a junk detector"
                                 f"{_did_you_mean(name, JUNK_DETECTORS)}; use [] or some of "
                                 f"{', '.join(JUNK_DETECTORS)}")
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
        out = self.model_dump(mode="json", by_alias=True)
        if out.get("public_fraction") is None:  # an unset key leaves the fingerprint as it was
            out.pop("public_fraction", None)
        return out

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
        return (f"Task(name={self.name!r}, classes={list(self.classes)!r}, "
                f"metric={self.metric!r}{where})")
