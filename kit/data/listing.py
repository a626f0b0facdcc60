"""Listing one split of a dataset as its task describes it, and reading its labels file.

Each problem found goes to the caller's ``fatal`` list (the dataset is unusable) or to its
per-sample problems (``--skip-bad`` drops that sample), one line naming the file;
:func:`kit.data.dataset.load_dataset` gathers them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kit import CLASSES
from kit.data.images import image_size
from kit.task import ID, LABEL, Task, pattern_folder, pattern_glob, pattern_regex, squash

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Sample:
    """One image (with its mask when the task has masks); ``label`` is None for test images,
    ``group`` None when the task names no group (patient) for it."""

    id: str  # the task's id: for AN2DL the image file name, as in train_labels.csv: img_0000.png
    image: Path
    mask: Path | None = None
    label: str | None = None
    group: str | None = None

    @property
    def sample_index(self) -> str:
        """The id under the name AN2DL's files give it (``sample_index`` columns)."""
        return self.id


def row_without_image(root: Path, task: Task, name: str) -> str:
    """The problem line of a labels-file row whose image is not there."""
    rel = task.path("images", "train", name)
    if rel is None:
        return (f"{task.labels.file}: row {name!r} does not match id_pattern "
                f"{task.id_pattern!r}, so it names no image; fix the id or id_pattern"
                f"{task.cite('id_pattern')}")
    hint = ""
    if (root / rel).is_file() and task.id_fields(name) is None:
        hint = (f" ({rel} exists, but {name!r} does not match id_pattern {task.id_pattern!r})")
    return (f"{task.labels.file}: row {name!r} has no image {rel}{hint}; remove the row or "
            f"restore the image{task.cite('images.train')}")


def suggest_label(label: str, classes=CLASSES) -> str | None:
    """The class ``label`` means when it differs from it only in case and spacing, else None.

    ``"triple  negative"``, ``"Luminal a"`` and ``"HER2(+) "`` give the exact class string.
    """
    return {squash(c): c for c in classes}.get(squash(label))


def _unknown_label_fix(label: str, task: Task) -> str:
    guess = suggest_label(label, task.classes)
    fix = f"did you mean {guess!r}?" if guess else f"allowed: {', '.join(task.classes)}"
    return fix + task.cite("classes")


def read_labels(root: Path, task: Task, fatal: list[str], per_sample: dict,
                 repeated: dict) -> tuple[dict, dict] | None:
    """The usable ``id -> label`` and ``id -> group`` rows of the task's labels file.

    Problems with the file itself go to ``fatal``. Row problems (unknown label, rows of one
    image with different labels or groups) go to ``per_sample`` under ``("train", id)``, so
    that ``--skip-bad`` drops that image; identical repeated rows go to ``repeated``
    (``--skip-bad`` keeps one of them).
    """
    spec = task.labels
    path = root / spec.file
    columns = [c for c in (spec.id, spec.label, spec.group) if c is not None]
    header = ",".join(columns)
    if not path.exists():
        fatal.append(f"{path}: labels file missing; it must hold {header} rows"
                     f"{task.cite('labels.file')}")
        return None
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises several types for unparsable CSV
        fatal.append(f"{path}: cannot be read as CSV ({exc}); expected header {header}")
        return None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        fatal.append(f"{path}: missing column(s) {', '.join(missing)}; expected header "
                     f"{header} (found: {','.join(df.columns)}){task.cite('labels')}")
        return None
    df = df[columns].rename(columns={spec.id: "id", spec.label: "label",
                                     **({spec.group: "group"} if spec.group else {})})
    for i, (name, label) in enumerate(zip(df["id"], df["label"])):
        if label not in task.classes:
            per_sample.setdefault(("train", name), []).append(
                f"{path}: line {i + 2}: unknown label {label!r} for {name}; "
                f"{_unknown_label_fix(label, task)}")
    dup = df[df.duplicated("id", keep=False)]
    for name, rows in dup.groupby("id", sort=True):
        lines = ", ".join(str(i + 2) for i in rows.index)
        if len(rows.drop_duplicates()) == 1:
            repeated.setdefault(("train", name), []).append(
                f"{path}: {name} appears on {len(rows)} lines ({lines}); keep one row per image")
        else:
            differ = "label" if rows["label"].nunique() > 1 else "group"
            what = "labels" if differ == "label" else f"{spec.group} values"
            found = ", ".join(f"{v!r}" for v in rows[differ])
            per_sample.setdefault(("train", name), []).append(
                f"{path}: {name} appears on {len(rows)} lines ({lines}) with different {what} "
                f"({found}); keep the one right row")
    bad = {name for (_, name) in per_sample}
    df = df[~df["id"].isin(bad)].drop_duplicates("id")
    labels = dict(zip(df["id"], df["label"]))
    groups = dict(zip(df["id"], df["group"])) if spec.group else {}
    return labels, {k: (v if v.strip() else None) for k, v in groups.items()}


def match_files(root: Path, task: Task, pattern: str):
    """``(path, fields)`` of every file under ``root`` that ``pattern`` describes, sorted by
    path: fields are the pattern's (``id``, ``label``) plus ``id_pattern``'s groups. Hidden
    files and files whose id ``id_pattern`` rejects are left out."""
    rx = pattern_regex(pattern)
    for path in sorted(root.glob(pattern_glob(pattern))):
        rel = path.relative_to(root).as_posix()
        m = rx.fullmatch(rel)
        if m is None or any(part.startswith(".") for part in rel.split("/")):
            continue
        fields = dict(m.groupdict())
        if ID in fields:
            extra = task.id_fields(fields[ID])
            if extra is None or any(fields.get(k, v) != v for k, v in extra.items()):
                continue
            fields.update(extra)
        yield path, rel, fields


def _unexplained(folder: Path, matched: set[Path]) -> Path | None:
    """An entry of ``folder`` that none of the ``matched`` files is or lies in, else None."""
    entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    if not entries or any(m == e or e in m.parents for m in matched for e in entries):
        return None
    return entries[0]


def _no_match(root: Path, task: Task, key: str, folder: Path, example: Path) -> str:
    pattern = task.patterns()[key]
    rx = f" with id_pattern {task.id_pattern!r}" if task.id_pattern and "{id}" in pattern else ""
    fix = (f"rename the files to follow it, or fix {key} in {task.source}" if not task.builtin
           else f"the {task.name} task expects that layout; pass --task FILE for another one")
    return (f"{folder}: {key} {pattern!r}{rx} matches no file here (it holds e.g. "
            f"{example.relative_to(root).as_posix()}); {fix}")


def list_split(root: Path, task: Task, split: str, fatal: list[str], problems: dict,
                check_pixels: bool) -> tuple[list[Sample], bool]:
    """The samples of one split (training ones labelled in the folders layout), and whether
    its images pattern matched no file in a folder of other files (then its rows' "no image"
    lines would only repeat that)."""
    image_pattern = getattr(task.images, split)
    folder = root / pattern_folder(image_pattern)
    if not folder.is_dir():
        needs = " and ".join(dict.fromkeys(f"{pattern_folder(getattr(task.images, s))}/"
                                           for s in SPLITS))
        fatal.append(f"{folder}: folder missing; the dataset needs {needs}"
                     f"{task.cite(f'images.{split}')}")
        return [], False
    images: dict[str, tuple[Path, dict]] = {}
    labels_of: dict[str, str] = {}
    for path, _, fields in match_files(root, task, image_pattern):
        sid = fields[ID]
        if sid in images:  # the folders layout: one file name under two classes
            problems.setdefault((split, sid), []).append(
                f"{path}: id {sid!r} is also {images[sid][0]}; ids must be unique across class "
                "folders, rename or delete one")
            continue
        images[sid] = (path, fields)
        if LABEL in fields:
            labels_of[sid] = fields[LABEL]
    matched = {p for p, _ in images.values()}

    mask_files: dict[str, tuple[Path, dict]] = {}
    masks_missing = False
    if task.has_masks:
        mask_pattern = getattr(task.masks, split)
        mask_folder = root / pattern_folder(mask_pattern)
        if not mask_folder.is_dir():
            fatal.append(f"{mask_folder}: folder missing; masks.{split} {mask_pattern!r} points "
                         f"into it{task.cite(f'masks.{split}')}")
            masks_missing = True
        else:
            mask_files = {rel: (p, f) for p, rel, f in match_files(root, task, mask_pattern)}
            matched |= {p for p, _ in mask_files.values()}
            if not mask_files and images:
                other = _unexplained(mask_folder, matched)
                if other is not None:
                    fatal.append(_no_match(root, task, f"masks.{split}", mask_folder, other))
                    masks_missing = True
    unmatched = False
    if not images:
        other = _unexplained(folder, matched)
        if other is not None:
            fatal.append(_no_match(root, task, f"images.{split}", folder, other))
            unmatched = True

    bad_classes: dict[str, list[str]] = {}
    samples, claimed = [], set()
    for sid in sorted(images, key=task.sort_key):
        path, fields = images[sid]
        label = labels_of.get(sid)
        if label is not None and label not in task.classes:
            bad_classes.setdefault(label, []).append(sid)
            continue
        found = problems.setdefault((split, sid), [])
        if task.has_masks:
            rel = getattr(task.masks, split).format(**fields)
            claimed.add(rel)
            mask = root / rel
            if masks_missing:  # the fatal line says it; listed so its row is not "imageless"
                samples.append(Sample(sid, path, None, label))
            elif rel not in mask_files:
                found.append(f"{path}: image has no mask (expected {mask})"
                             f"{task.cite(f'masks.{split}')}")
            else:
                img_size = image_size(path, found, check_pixels)
                mask_size = image_size(mask, found, check_pixels)
                if img_size and mask_size and img_size != mask_size:
                    found.append(f"{path}: image is {img_size[0]}x{img_size[1]} but its mask "
                                 f"{mask.name} is {mask_size[0]}x{mask_size[1]}; they must match"
                                 f"{task.cite(f'masks.{split}')}")
                samples.append(Sample(sid, path, mask, label))
        else:
            image_size(path, found, check_pixels)
            samples.append(Sample(sid, path, None, label))
        if not found:
            del problems[(split, sid)]
    for rel in sorted(set(mask_files) - claimed):
        mask, fields = mask_files[rel]
        sid = task.id_from_fields(fields)
        image = task.path("images", split, sid) if sid is not None else None
        expected = f" (expected {root / image})" if image else (
            f" (no file of images.{split} {image_pattern!r} has it)")
        problems.setdefault((split, sid if sid is not None else rel), []).append(
            f"{mask}: mask has no image{expected}{task.cite(f'masks.{split}')}")
    for label, ids in sorted(bad_classes.items()):
        where = root / pattern_folder(image_pattern) / label
        guess = suggest_label(label, task.classes)
        fix = (f"did you mean {guess!r}? rename the folder" if guess else
               f"allowed: {', '.join(task.classes)}; rename the folder or add the class")
        problems.setdefault((split, f"{where}/"), []).append(
            f"{where}: folder {label!r} is not a class ({len(ids)} images); {fix}"
            f"{task.cite('classes')}")
    return samples, unmatched
