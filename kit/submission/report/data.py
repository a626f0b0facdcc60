"""The report's data section: images per class (all, junk dropped, clean) and thumbnails of
the junk found; the thumbnail cards the label-issues section shows too. The labels and the
images come from the dataset's task, whatever its layout."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from kit.data.clean import load_outliers, load_overrides
from kit.data.dataset import expected_test_ids, find_root, jpeg_thumbnail, load_dataset
from kit.paths import Paths
from kit.submission.report.layout import Bold, fmt, inline_image, make_table
from kit.task import Task, as_data
from kit.utils import KitError


@dataclass
class Training:
    """A dataset's training images as the report shows them: the root, the task, the labels
    by id and each image's file: ``Sample.image`` where the dataset was listed (the folders
    layout), else the path ``images.train`` gives the id, as ``Sample.image`` is made (a
    labels file lists ids whose images may be gone: the report says so per thumbnail)."""

    root: Path | None
    task: Task
    labels: dict[str, str] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)

    def image(self, sample_id: str) -> Path | None:
        if self.root is None:
            return None
        if sample_id in self.images:
            return self.images[sample_id]
        rel = self.task.path("images", "train", sample_id, self.labels.get(sample_id))
        return None if rel is None else self.root / rel


def training(data) -> tuple[Training, str | None]:
    """The training images of ``data`` (a :class:`~kit.task.Data` or a root), and what
    stopped reading them (None when nothing did)."""
    data = as_data(data)
    try:
        root = find_root(data, data.task)
    except KitError as exc:
        return Training(None, data.task), str(exc)
    found, task = Training(root, data.task), data.task
    if task.layout == "folders":  # no labels file: the classes are the images' folders
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # --skip-bad's list: validate says it
                listed = load_dataset(root, skip_bad=True, check_pixels=False, task=task)
        except KitError as exc:
            return found, str(exc)
        found.images = {s.id: s.image for s in listed.train}
        found.labels = {s.id: s.label for s in listed.train}
        return found, None
    path = root / task.labels.file  # the file's rows, whether their images exist or not
    if not path.is_file():
        return found, f"{path}: not found"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if task.labels.id not in df.columns or task.labels.label not in df.columns:
        return found, (f"{path}: no {task.labels.id} and {task.labels.label} columns; "
                       f"./run.sh validate says what is wrong")
    found.labels = dict(zip(df[task.labels.id], df[task.labels.label]))
    return found, None


def data_section(paths: Paths, data, cfg: dict) -> dict:
    """Counts per class (all, flagged as junk, clean) and thumbnails of the junk found."""
    ctx = {"problem": None, "n_train": 0, "n_test": 0, "root": "", "clean_note": "",
           "counts": None}
    train, problem = training(data)
    if problem is not None:
        return {**ctx, "problem": problem, "junk": _junk_part(paths, train, cfg)}
    root, labels, task = train.root, train.labels, train.task
    dropped = _dropped(paths)
    clean = _clean_labels(paths, labels, dropped)
    classes = list(task.classes) + sorted(set(labels.values()) - set(task.classes))
    rows = []
    for c in classes:
        n_all = sum(v == c for v in labels.values())
        n_junk = (sum(labels[i] == c for i in dropped if i in labels) if dropped is not None
                  else None)
        n_clean = sum(v == c for v in clean.values()) if clean is not None else None
        rows.append([c, n_all, n_junk, n_clean])
    total = [Bold("total"), len(labels),
             len([i for i in dropped if i in labels]) if dropped is not None else None,
             len(clean) if clean is not None else None]
    try:
        n_test = len(expected_test_ids(root, task=task))
    except KitError:  # no test folder: nothing to count
        n_test = 0
    clean_note = ("clean = the images in folds/folds.csv" if paths.folds_csv.is_file()
                  else "clean = labels minus dropped junk")
    return {**ctx, "n_train": len(labels), "n_test": n_test, "root": str(root),
            "clean_note": clean_note,
            "counts": make_table(["class", "training images", "junk dropped", "clean"],
                                 rows + [total]),
            "junk": _junk_part(paths, train, cfg)}


def _dropped(paths: Paths) -> set[str] | None:
    """Images left out as junk: flagged and not kept by an override, plus overrides ``drop``."""
    if not paths.outliers_csv.is_file():
        return None
    outliers, overrides = load_outliers(paths), load_overrides(paths)
    action = dict(zip(overrides["sample_index"], overrides["action"]))
    dropped = {i for i in outliers["sample_index"] if action.get(i) != "keep"}
    return dropped | {i for i, a in action.items() if a == "drop"}


def _clean_labels(paths: Paths, labels: dict, dropped: set | None) -> dict | None:
    if paths.folds_csv.is_file():
        folds = pd.read_csv(paths.folds_csv, dtype=str, keep_default_na=False)
        return dict(zip(folds["sample_index"], folds["label"]))
    if dropped is None:
        return None
    return {i: c for i, c in labels.items() if i not in dropped}


def _junk_part(paths: Paths, train: Training, cfg: dict) -> dict | None:
    """The junk found: counts by reason and thumbnails (highest score first per reason, at
    most ``report.max_thumbs``); None when clean has not run."""
    if not paths.outliers_csv.is_file():
        return None
    outliers = load_outliers(paths)
    counts = outliers["reason"].value_counts()
    shown = outliers.sort_values(["reason", "score"], ascending=[True, False])
    shown = shown.head(int(cfg["max_thumbs"]))
    return {"n": len(outliers), "reasons": ", ".join(f"{int(n)} {r}" for r, n in counts.items()),
            "cards": [thumb_card(train, r, int(cfg["thumb_side"]))
                     for r in shown.itertuples(index=False)]}


def thumb_card(train: Training, row, side: int, caption: str | None = None,
               cls: str = "junk") -> dict:
    """A training image's thumbnail (its file as the task finds it) with a caption (by
    default the junk reason and score); no image (shown as "image not found") when there is
    no such file."""
    if caption is None:
        caption = f"{row.sample_index} · {row.reason} {fmt(row.score, 3)}"
    path = train.image(row.sample_index)
    image = None
    if path is not None and path.is_file():
        image = inline_image(thumbnail(path, side), "image/jpeg", row.sample_index)
    return {"cls": cls, "img": image, "caption": caption}


def thumbnail(path: Path, side: int) -> bytes:
    """A JPEG thumbnail (longest side ``side``) of an image file."""
    with Image.open(path) as im:
        im.draft("RGB", (side, side))  # cheap downscale on decode where the format allows it
        return jpeg_thumbnail(im, side)
