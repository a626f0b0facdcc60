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

from kit.data.images import (  # noqa: F401 (re-exported: where the stages import them from)
    jpeg_thumbnail,
    read_image,
    read_mask,
    to_rgb_array,
)
from kit.data.listing import (  # noqa: F401 (Sample and suggest_label re-exported)
    SPLITS,
    Sample,
    list_split,
    match_files,
    read_labels,
    row_without_image,
    suggest_label,
)
from kit.task import ID, TASK_FILE, Data, Task, default_task, load_task, pattern_folder
from kit.utils import KitError, sha256_file

LABELS_CSV = "train_labels.csv"  # the AN2DL task's labels file


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
    """The task of ``task`` (what :func:`kit.task.load_task` takes); None: a
    :class:`kit.task.Data` root's own task, else the one found for ``root`` (its
    ``task.yaml``, else the built-in AN2DL task), as :func:`kit.task.as_data` finds it."""
    if task is None and isinstance(root, Data):
        return root.task
    if task is None and root is None:
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
    task = _task(task, path)
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
        :func:`kit.task.load_task` takes); None: ``root``'s own when it is a
        :class:`kit.task.Data`, else ``task.yaml`` in ``root``, else the built-in AN2DL task.

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
        found = read_labels(root, task, fatal, per_sample, repeated)
        if found is not None:
            labels, groups = found

    splits, unmatched = {}, {}
    for split in SPLITS:
        splits[split], unmatched[split] = list_split(root, task, split, fatal, per_sample,
                                                      check_pixels)

    if labels is not None:
        train_ids = {s.id for s in splits["train"]}
        bad_train = {name for (split, name) in per_sample if split == "train"}
        for name in labels:
            if name not in train_ids and name not in bad_train and not unmatched["train"]:
                per_sample.setdefault(("train", name), []).append(
                    row_without_image(root, task, name))
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
        return sorted(fields[ID] for _, _, fields in match_files(root, task, task.images.test))
    if isinstance(test_dir_or_ids, (str, os.PathLike)):
        folder = Path(test_dir_or_ids)
        if (folder / "test_data").is_dir():
            folder = folder / "test_data"
        if not folder.is_dir():
            raise KitError(f"{folder}: test image folder not found; pass the dataset's test_data/ "
                           "folder (or --data to the dataset root)")
        return sorted(p.name for p in folder.glob("img_*.png"))
    return sorted(str(i) for i in test_dir_or_ids)
