"""The report's data section: images per class (all, junk dropped, clean) and thumbnails of
the junk found; the thumbnail cards the label-issues section shows too."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image

from kit import CLASSES
from kit.data.clean import load_outliers, load_overrides
from kit.data.dataset import LABELS_CSV, find_root, jpeg_thumbnail
from kit.paths import Paths
from kit.submission.report.layout import Bold, fmt, inline_image, make_table
from kit.utils import KitError


def data_section(paths: Paths, data, cfg: dict) -> dict:
    """Counts per class (all, flagged as junk, clean) and thumbnails of the junk found."""
    ctx = {"problem": None, "n_train": 0, "n_test": 0, "root": "", "clean_note": "",
           "counts": None}
    try:
        root = find_root(data)
    except KitError as exc:
        return {**ctx, "problem": str(exc), "junk": _junk_part(paths, None, cfg)}
    labels_path = root / LABELS_CSV
    if not labels_path.is_file():
        return {**ctx, "problem": f"{labels_path}: not found",
                "junk": _junk_part(paths, root, cfg)}
    labels = pd.read_csv(labels_path, dtype=str, keep_default_na=False)
    labels = dict(zip(labels["sample_index"], labels["label"]))
    dropped = _dropped(paths)
    clean = _clean_labels(paths, labels, dropped)
    classes = list(CLASSES) + sorted(set(labels.values()) - set(CLASSES))
    rows = []
    for c in classes:
        n_all = sum(v == c for v in labels.values())
        n_junk = sum(labels[i] == c for i in dropped if i in labels) if dropped is not None else None
        n_clean = sum(v == c for v in clean.values()) if clean is not None else None
        rows.append([c, n_all, n_junk, n_clean])
    total = [Bold("total"), len(labels),
             len([i for i in dropped if i in labels]) if dropped is not None else None,
             len(clean) if clean is not None else None]
    n_test = len(list((root / "test_data").glob("img_*.png"))) if (root / "test_data").is_dir() else 0
    clean_note = ("clean = the images in folds/folds.csv" if paths.folds_csv.is_file()
                  else "clean = labels minus dropped junk")
    return {**ctx, "n_train": len(labels), "n_test": n_test, "root": str(root),
            "clean_note": clean_note,
            "counts": make_table(["class", "training images", "junk dropped", "clean"],
                                 rows + [total]),
            "junk": _junk_part(paths, root, cfg)}


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


def _junk_part(paths: Paths, root: Path | None, cfg: dict) -> dict | None:
    """The junk found: counts by reason and thumbnails (highest score first per reason, at
    most ``report.max_thumbs``); None when clean has not run."""
    if not paths.outliers_csv.is_file():
        return None
    outliers = load_outliers(paths)
    counts = outliers["reason"].value_counts()
    shown = outliers.sort_values(["reason", "score"], ascending=[True, False])
    shown = shown.head(int(cfg["max_thumbs"]))
    return {"n": len(outliers), "reasons": ", ".join(f"{int(n)} {r}" for r, n in counts.items()),
            "cards": [thumb_card(root, r, int(cfg["thumb_side"]))
                     for r in shown.itertuples(index=False)]}


def thumb_card(root: Path | None, row, side: int, caption: str | None = None,
               cls: str = "junk") -> dict:
    """A training image's thumbnail (``root/train_data/<sample_index>``) with a caption (by
    default the junk reason and score); no image (shown as "image not found") when there is
    no such file."""
    if caption is None:
        caption = f"{row.sample_index} · {row.reason} {fmt(row.score, 3)}"
    path = root / "train_data" / row.sample_index if root is not None else None
    image = None
    if path is not None and path.is_file():
        image = inline_image(thumbnail(path, side), "image/jpeg", row.sample_index)
    return {"cls": cls, "img": image, "caption": caption}


def thumbnail(path: Path, side: int) -> bytes:
    """A JPEG thumbnail (longest side ``side``) of an image file."""
    with Image.open(path) as im:
        im.draft("RGB", (side, side))  # cheap downscale on decode where the format allows it
        return jpeg_thumbnail(im, side)
