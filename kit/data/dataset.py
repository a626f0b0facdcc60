"""Reading and validating a dataset laid out as its task (:mod:`kit.task`) describes.

The built-in AN2DL task's layout, the default::

    <root>/train_data/img_0000.png  <root>/train_data/mask_0000.png  ...
    <root>/test_data/img_0000.png   <root>/test_data/mask_0000.png   ...
    <root>/train_labels.csv         # sample_index,label  (img_0000.png,Luminal B)

Another competition's comes from its task file: a labels CSV with its own columns (and a
patient group), or the class as the image's folder; images and masks where its path patterns
say (``docs/tasks.md``).

``load_dataset`` checks everything before any work starts and reports every problem at once,
one line each with the file name (and, for a task file of the user's, the key of it that
led there); non-RGB images are converted on read, not rejected. With ``skip_bad`` the
samples and label rows with problems are dropped instead, one warning line each.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from kit import CLASSES
from kit.task import (ID, LABEL, Task, default_task, load_task, pattern_folder, pattern_glob,
                      pattern_regex, squash)
from kit.utils import KitError, sha256_file

LABELS_CSV = "train_labels.csv"  # the AN2DL task's labels file
SPLITS = ("train", "test")

Image.MAX_IMAGE_PIXELS = None  # test scans reach ~6200 x 1024 and some teams upscaled; trust the data


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


def _default_task() -> Task:
    return default_task()


@dataclass
class Dataset:
    """The validated samples of one dataset root, and the task that describes it."""

    root: Path
    train: list[Sample]
    test: list[Sample]
    dropped: list[str] = field(default_factory=list)  # problems skipped with --skip-bad
    task: Task = field(default_factory=_default_task)

    def split(self, name: str) -> list[Sample]:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return self.train if name == "train" else self.test


def _task(task, root=None) -> Task:
    # None means the built-in AN2DL task here, not the data folder's task.yaml: the stages
    # that call without a task still assume AN2DL (commands resolve the task with load_task).
    if task is None:
        return default_task()
    return load_task(task, root)


def _top(pattern: str) -> str | None:
    folder = pattern_folder(pattern)
    return folder.split("/", 1)[0] if folder else None


def _holding(task: Task) -> str:
    """``train_data/, test_data/ and train_labels.csv``: what a dataset root holds."""
    items = []
    for pattern in task.patterns().values():
        top = _top(pattern)
        if top and f"{top}/" not in items:
            items.append(f"{top}/")
    if task.layout == "csv":
        items.append(task.labels.file)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def find_root(path: str | Path, task: Task | None = None) -> Path:
    """Resolve a dataset root: the folder itself, or its only child holding the training
    images' folder (``train_data/`` for AN2DL).

    Kaggle mounts competitions as ``/kaggle/input/<slug>/`` and some downloads unzip one level
    deeper, so one nested level is accepted.
    """
    from kit.task import TASK_FILE

    task = _task(task)
    path = Path(path).expanduser()
    holding = _holding(task)
    if not path.is_dir():
        raise KitError(f"{path}: dataset folder not found; pass --data DIR (or set KIT_DATA) "
                       f"to the folder holding {holding}, "
                       "or run ./run.sh demo for generated data")
    top = _top(task.images.train)
    labels = task.labels.file if task.layout == "csv" else None
    if ((top and (path / top).is_dir()) or (labels and (path / labels).exists())
            or (path / TASK_FILE).is_file() or not (top or labels)):
        return path
    nested = [p for p in sorted(path.iterdir()) if p.is_dir() and top and (p / top).is_dir()]
    if len(nested) == 1:
        return nested[0]
    what = f"{top}/ folder" if top else labels
    raise KitError(f"{path}: no {what} here (nor one level down); pass --data to the "
                   f"folder holding {holding}")


def load_dataset(root: str | Path, skip_bad: bool = False, check_pixels: bool = True,
                 task=None) -> Dataset:
    """Find, check and list every sample under ``root``.

    Parameters
    ----------
    root : path
        Dataset root (see :func:`find_root`).
    skip_bad : bool
        Drop samples with problems (with one warning line per problem) instead of refusing
        the dataset: broken or unpaired files, and the labels file's rows with an unknown
        label, with a conflicting repeat (the image is dropped) or without an image. An
        identical repeated row collapses to one. Problems with the labels file as a whole
        (missing, unreadable, wrong header), missing folders and a path pattern that matches
        no file are always fatal.
    check_pixels : bool
        Verify every image's chunks (catches truncated and corrupt PNG files).
    task : Task, str or None
        The task describing the layout (a :class:`kit.task.Task`, or what
        :func:`kit.task.load_task` takes); None: the built-in AN2DL task.

    Raises
    ------
    KitError
        With one line per problem, naming the file.
    """
    task = _task(task, root)
    root = find_root(root, task)
    fatal: list[str] = []
    per_sample: dict[tuple[str, str], list[str]] = {}
    repeated: dict[tuple[str, str], list[str]] = {}  # identical repeats: fixed by collapsing
    labels = groups = None
    if task.layout == "csv":
        found = _read_labels(root, task, fatal, per_sample, repeated)
        if found is not None:
            labels, groups = found

    splits, unmatched = {}, {}
    for split in SPLITS:
        splits[split], unmatched[split] = _list_split(root, task, split, fatal, per_sample,
                                                      check_pixels)

    if labels is not None:
        train_ids = {s.id for s in splits["train"]}
        bad_train = {name for (split, name) in per_sample if split == "train"}
        for name in labels:
            if name not in train_ids and name not in bad_train and not unmatched["train"]:
                per_sample.setdefault(("train", name), []).append(_row_without_image(root, task, name))
        train = []
        for s in splits["train"]:
            if s.id in labels:
                train.append(Sample(s.id, s.image, s.mask, labels[s.id], groups.get(s.id)))
            elif ("train", s.id) not in per_sample:  # else its row's problem says it
                per_sample[("train", s.id)] = [(
                    f"{s.image}: image has no label in {task.labels.file}; add a row or delete "
                    f"the image{task.cite('labels.file')}")]
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
        also = (f" and {_count(repeated)} repeated row(s) of {task.labels.file} (one kept)"
                if repeated else "")
        warnings.warn(f"--skip-bad: dropping {len(per_sample)} samples with problems{also}:\n  "
                      + "\n  ".join(dropped), stacklevel=2)
        for split in SPLITS:
            splits[split] = [s for s in splits[split] if (split, s.id) not in per_sample]
    return Dataset(root, splits["train"], splits["test"], dropped, task)


def _row_without_image(root: Path, task: Task, name: str) -> str:
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


def suggest_label(label: str, classes=CLASSES) -> str | None:
    """The class ``label`` means when it differs from it only in case and spacing, else None.

    ``"triple  negative"``, ``"Luminal a"`` and ``"HER2(+) "`` give the exact class string.
    """
    return {squash(c): c for c in classes}.get(squash(label))


def _unknown_label_fix(label: str, task: Task) -> str:
    guess = suggest_label(label, task.classes)
    fix = f"did you mean {guess!r}?" if guess else f"allowed: {', '.join(task.classes)}"
    return fix + task.cite("classes")


def _read_labels(root: Path, task: Task, fatal: list[str], per_sample: dict,
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


def _match(root: Path, task: Task, pattern: str):
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


def _list_split(root: Path, task: Task, split: str, fatal: list[str], problems: dict,
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
    for path, _, fields in _match(root, task, image_pattern):
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
            mask_files = {rel: (p, f) for p, rel, f in _match(root, task, mask_pattern)}
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
                img_size = _image_size(path, found, check_pixels)
                mask_size = _image_size(mask, found, check_pixels)
                if img_size and mask_size and img_size != mask_size:
                    found.append(f"{path}: image is {img_size[0]}x{img_size[1]} but its mask "
                                 f"{mask.name} is {mask_size[0]}x{mask_size[1]}; they must match"
                                 f"{task.cite(f'masks.{split}')}")
                samples.append(Sample(sid, path, mask, label))
        else:
            _image_size(path, found, check_pixels)
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


def _image_size(path: Path, problems: list[str], check_pixels: bool) -> tuple[int, int] | None:
    kind = path.suffix.lstrip(".").upper() or "image"
    try:
        with Image.open(path) as im:
            size = im.size
            if check_pixels:
                im.verify()  # chunk CRCs and the end marker, without decoding every pixel
        return size
    except Exception as exc:  # PIL raises many types for broken files
        problems.append(f"{path}: unreadable or truncated {kind} ({type(exc).__name__}: {exc}); "
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
    """Map each sample to a group id shared by every sample whose mask file is byte-identical
    (a sample without a mask is its own group)."""
    by_hash: dict[str, str] = {}
    groups = {}
    for s in samples:
        if s.mask is None:
            groups[s.sample_index] = s.sample_index
            continue
        h = sha256_file(s.mask)
        groups[s.sample_index] = by_hash.setdefault(h, s.sample_index)
    return groups


def label_groups(samples: list[Sample]) -> dict[str, str]:
    """Map each sample to the smallest id of the samples sharing its ``group`` (its own id
    when it has none): the labels file's patient groups in the form ``folds`` records."""
    first: dict[str, str] = {}
    for s in samples:
        if s.group is not None:
            first[s.group] = min(first.get(s.group, s.id), s.id)
    return {s.id: first[s.group] if s.group is not None else s.id for s in samples}


def expected_test_ids(test_dir_or_ids, task: Task | None = None) -> list[str]:
    """Sorted test ids: the ``img_*.png`` files of a folder, or given ids.

    A dataset root holding ``test_data/`` is accepted in place of ``test_data/`` itself. With
    a ``task``, a path is its dataset root and the ids are the files ``images.test`` matches.
    """
    if task is not None and isinstance(test_dir_or_ids, (str, os.PathLike)):
        task = _task(task, test_dir_or_ids)
        root = find_root(test_dir_or_ids, task)
        return sorted(fields[ID] for _, _, fields in _match(root, task, task.images.test))
    if isinstance(test_dir_or_ids, (str, os.PathLike)):
        folder = Path(test_dir_or_ids)
        if (folder / "test_data").is_dir():
            folder = folder / "test_data"
        if not folder.is_dir():
            raise KitError(f"{folder}: test image folder not found; pass the dataset's test_data/ "
                           "folder (or --data to the dataset root)")
        return sorted(p.name for p in folder.glob("img_*.png"))
    return sorted(str(i) for i in test_dir_or_ids)
