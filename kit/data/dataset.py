"""Reading and validating a dataset in the challenge layout.

::

    <root>/train_data/img_0000.png  <root>/train_data/mask_0000.png  ...
    <root>/test_data/img_0000.png   <root>/test_data/mask_0000.png   ...
    <root>/train_labels.csv         # sample_index,label  (img_0000.png,Luminal B)

``load_dataset`` checks everything before any work starts and reports every problem at once,
one line each with the file name; non-RGB images are converted on read, not rejected. With
``skip_bad`` the samples and label rows with problems are dropped instead, one warning line
each.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from kit import CLASSES
from kit.utils import KitError, sha256_file

LABELS_CSV = "train_labels.csv"
SPLITS = ("train", "test")
_IMG_RE = re.compile(r"^img_(.+)\.png$")
_MASK_RE = re.compile(r"^mask_(.+)\.png$")

Image.MAX_IMAGE_PIXELS = None  # test scans reach ~6200 x 1024 and some teams upscaled; trust the data


@dataclass(frozen=True)
class Sample:
    """One image/mask pair; ``label`` is None for test images."""

    sample_index: str  # the image file name, as in train_labels.csv: img_0000.png
    image: Path
    mask: Path
    label: str | None = None


@dataclass
class Dataset:
    """The validated samples of one dataset root."""

    root: Path
    train: list[Sample]
    test: list[Sample]
    dropped: list[str] = field(default_factory=list)  # problems skipped with --skip-bad

    def split(self, name: str) -> list[Sample]:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return self.train if name == "train" else self.test


def find_root(path: str | Path) -> Path:
    """Resolve a dataset root: the folder itself, or its only child holding ``train_data/``.

    Kaggle mounts competitions as ``/kaggle/input/<slug>/`` and some downloads unzip one level
    deeper, so one nested level is accepted.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise KitError(f"{path}: dataset folder not found; pass --data DIR (or set KIT_DATA) "
                       "to the folder holding train_data/, test_data/ and train_labels.csv, "
                       "or run ./run.sh demo for generated data")
    if (path / "train_data").is_dir() or (path / LABELS_CSV).exists():
        return path
    nested = [p for p in sorted(path.iterdir()) if p.is_dir() and (p / "train_data").is_dir()]
    if len(nested) == 1:
        return nested[0]
    raise KitError(f"{path}: no train_data/ folder here (nor one level down); pass --data to the "
                   "folder holding train_data/, test_data/ and train_labels.csv")


def load_dataset(root: str | Path, skip_bad: bool = False, check_pixels: bool = True) -> Dataset:
    """Find, check and list every sample under ``root``.

    Parameters
    ----------
    root : path
        Dataset root (see :func:`find_root`).
    skip_bad : bool
        Drop samples with problems (with one warning line per problem) instead of refusing
        the dataset: broken or unpaired files, and the ``train_labels.csv`` rows with an
        unknown label, with a conflicting repeat (the image is dropped) or without an image.
        An identical repeated row collapses to one. Problems with the labels file as a whole
        (missing, unreadable, wrong header) and missing folders are always fatal.
    check_pixels : bool
        Verify every PNG's chunks (catches truncated and corrupt files).

    Raises
    ------
    KitError
        With one line per problem, naming the file.
    """
    root = find_root(root)
    fatal: list[str] = []
    per_sample: dict[tuple[str, str], list[str]] = {}
    repeated: dict[tuple[str, str], list[str]] = {}  # identical repeats: fixed by collapsing
    labels = _read_labels(root / LABELS_CSV, fatal, per_sample, repeated)

    splits = {}
    for split in SPLITS:
        folder = root / f"{split}_data"
        if not folder.is_dir():
            fatal.append(f"{folder}: folder missing; the dataset needs train_data/ and test_data/")
            splits[split] = []
            continue
        splits[split] = _pair_files(folder, split, per_sample, check_pixels)

    train_names = {s.sample_index for s in splits["train"]}
    bad_train = {name for (split, name) in per_sample if split == "train"}
    if labels is not None:
        for name in labels.index:
            if name not in train_names and name not in bad_train:
                per_sample.setdefault(("train", name), []).append(
                    f"{LABELS_CSV}: row {name!r} has no image train_data/{name}; remove the row "
                    "or restore the image")
        train = []
        for s in splits["train"]:
            if s.sample_index in labels.index:
                train.append(Sample(s.sample_index, s.image, s.mask, str(labels[s.sample_index])))
            elif ("train", s.sample_index) not in per_sample:  # else its row's problem says it
                per_sample[("train", s.sample_index)] = [
                    f"{s.image}: image has no label in {LABELS_CSV}; add a row or delete the image"]
        splits["train"] = train

    if fatal:
        problems = fatal + _lines(_merge(per_sample, repeated))
        raise KitError(f"{root}: dataset is not usable ({len(problems)} problems)", problems)
    if (per_sample or repeated) and not skip_bad:
        problems = _lines(_merge(per_sample, repeated))
        raise KitError(f"{root}: {len(problems)} problems; fix them or pass --skip-bad to drop "
                       "those samples", problems)
    dropped = _lines(_merge(per_sample, repeated))
    if dropped:
        also = (f" and {_count(repeated)} repeated row(s) of {LABELS_CSV} (one kept)"
                if repeated else "")
        warnings.warn(f"--skip-bad: dropping {len(per_sample)} samples with problems{also}:\n  "
                      + "\n  ".join(dropped), stacklevel=2)
        for split in SPLITS:
            splits[split] = [s for s in splits[split] if (split, s.sample_index) not in per_sample]
    return Dataset(root, splits["train"], splits["test"], dropped)


def _count(per_sample):
    return sum(len(v) for v in per_sample.values())


def _lines(per_sample):
    return [line for key in sorted(per_sample) for line in per_sample[key]]


def _merge(a: dict, b: dict) -> dict:
    """Problem lines of both dicts, per sample key (``a``'s lines first)."""
    out = {key: list(lines) for key, lines in a.items()}
    for key, lines in b.items():
        out.setdefault(key, []).extend(lines)
    return out


def _squash(text: str) -> str:
    return "".join(text.split()).casefold()


_SQUASHED = {_squash(c): c for c in CLASSES}


def suggest_label(label: str) -> str | None:
    """The class ``label`` means when it differs from it only in case and spacing, else None.

    ``"triple  negative"``, ``"Luminal a"`` and ``"HER2(+) "`` give the exact class string.
    """
    return _SQUASHED.get(_squash(label))


def _read_labels(path: Path, fatal: list[str], per_sample: dict, repeated: dict) -> pd.Series | None:
    """The usable ``sample_index -> label`` rows of the labels file.

    Problems with the file itself go to ``fatal``. Row problems (unknown label, rows of one
    image with different labels) go to ``per_sample`` under ``("train", name)``, so that
    ``--skip-bad`` drops that image; identical repeated rows go to ``repeated`` (``--skip-bad``
    keeps one of them).
    """
    if not path.exists():
        fatal.append(f"{path}: labels file missing; it must hold sample_index,label rows")
        return None
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises several types for unparsable CSV
        fatal.append(f"{path}: cannot be read as CSV ({exc}); expected header sample_index,label")
        return None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in ("sample_index", "label") if c not in df.columns]
    if missing:
        fatal.append(f"{path}: missing column(s) {', '.join(missing)}; expected header "
                     f"sample_index,label (found: {','.join(df.columns)})")
        return None
    df = df[["sample_index", "label"]]
    for i, row in df.iterrows():
        if row.label not in CLASSES:
            guess = suggest_label(row.label)
            fix = (f"did you mean {guess!r}?" if guess
                   else f"allowed: {', '.join(CLASSES)}")
            per_sample.setdefault(("train", row.sample_index), []).append(
                f"{path}: line {i + 2}: unknown label {row.label!r} for {row.sample_index}; {fix}")
    dup = df[df.duplicated("sample_index", keep=False)]
    for name, rows in dup.groupby("sample_index", sort=True):
        lines = ", ".join(str(i + 2) for i in rows.index)
        if rows.label.nunique() == 1:
            repeated.setdefault(("train", name), []).append(
                f"{path}: {name} appears on {len(rows)} lines ({lines}); keep one row per image")
        else:
            found = ", ".join(f"{lab!r}" for lab in rows.label)
            per_sample.setdefault(("train", name), []).append(
                f"{path}: {name} appears on {len(rows)} lines ({lines}) with different labels "
                f"({found}); keep the one right row")
    bad = {name for (_, name) in per_sample}
    df = df[~df.sample_index.isin(bad)].drop_duplicates("sample_index")
    return df.set_index("sample_index")["label"]


def _pair_files(folder: Path, split: str, problems: dict, check_pixels: bool) -> list[Sample]:
    images, masks = {}, {}
    for p in sorted(folder.iterdir()):
        if m := _IMG_RE.match(p.name):
            images[m.group(1)] = p
        elif m := _MASK_RE.match(p.name):
            masks[m.group(1)] = p
    samples = []
    for key in sorted(set(images) | set(masks)):
        name = f"img_{key}.png"
        found = problems.setdefault((split, name), [])
        if key not in masks:
            found.append(f"{images[key]}: image has no mask (expected {folder / f'mask_{key}.png'})")
        elif key not in images:
            found.append(f"{masks[key]}: mask has no image (expected {folder / name})")
        else:
            img_size = _png_size(images[key], found, check_pixels)
            mask_size = _png_size(masks[key], found, check_pixels)
            if img_size and mask_size and img_size != mask_size:
                found.append(f"{images[key]}: image is {img_size[0]}x{img_size[1]} but its mask "
                             f"{masks[key].name} is {mask_size[0]}x{mask_size[1]}; they must match")
            samples.append(Sample(name, images[key], masks[key]))
        if not found:
            del problems[(split, name)]
    return samples


def _png_size(path: Path, problems: list[str], check_pixels: bool) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:
            size = im.size
            if check_pixels:
                im.verify()  # chunk CRCs and the end marker, without decoding every pixel
        return size
    except Exception as exc:  # PIL raises many types for broken files
        problems.append(f"{path}: unreadable or truncated PNG ({type(exc).__name__}: {exc}); "
                        "re-download or delete the file")
        return None


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """Any PIL image (RGB, RGBA, L, LA, P, 16-bit) as uint8 ``H x W x 3``."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.uint32)
        arr = (arr >> 8) if arr.max(initial=0) > 255 else arr
        return np.repeat(arr.astype(np.uint8)[..., None], 3, axis=2)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def jpeg_thumbnail(im: Image.Image, side: int, quality: int = 80) -> bytes:
    """JPEG bytes of a copy of ``im`` shrunk to fit ``side`` x ``side`` (for review pages)."""
    import io

    thumb = im.convert("RGB") if im.mode != "RGB" else im.copy()
    thumb.thumbnail((side, side), Image.BILINEAR)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 ``H x W x 3`` RGB."""
    with Image.open(path) as im:
        return to_rgb_array(im)


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a mask to a bool ``H x W`` array; any value > 0 is inside."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    return arr > 0


def mask_groups(samples: list[Sample]) -> dict[str, str]:
    """Map each sample to a group id shared by every sample whose mask file is byte-identical."""
    by_hash: dict[str, str] = {}
    groups = {}
    for s in samples:
        h = sha256_file(s.mask)
        groups[s.sample_index] = by_hash.setdefault(h, s.sample_index)
    return groups


def expected_test_ids(test_dir_or_ids) -> list[str]:
    """Sorted test ``sample_index`` values: the ``img_*.png`` files of a folder, or given ids.

    A dataset root holding ``test_data/`` is accepted in place of ``test_data/`` itself.
    """
    if isinstance(test_dir_or_ids, (str, os.PathLike)):
        folder = Path(test_dir_or_ids)
        if (folder / "test_data").is_dir():
            folder = folder / "test_data"
        if not folder.is_dir():
            raise KitError(f"{folder}: test image folder not found; pass the dataset's test_data/ "
                           "folder (or --data to the dataset root)")
        return sorted(p.name for p in folder.glob("img_*.png"))
    return sorted(str(i) for i in test_dir_or_ids)
