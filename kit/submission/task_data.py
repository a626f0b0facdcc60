"""What the submission stage reads of a task's dataset: the test ids the submission must
have one row each for, the digest of the training labels a manifest records (the labels file,
or a listing where the folders are the labels), and the task a manifest was made for."""
from __future__ import annotations

import os

from kit.data.dataset import expected_test_ids, find_root, load_dataset
from kit.task import Data, Task, default_task, parse_task, pattern_folder
from kit.utils import KitError, sha256_file, sha256_text


def task_or_default(task, where=None) -> Task:
    """``task``, else the task of ``where`` when it is a :class:`~kit.task.Data`, else the
    built-in one."""
    if task is not None:
        return task
    return where.task if isinstance(where, Data) else default_task()


def test_ids(where, task: Task | None = None) -> list[str]:
    """Sorted test ids: the files the task's ``images.test`` matches under a dataset root (a
    path or a :class:`~kit.task.Data`), or the ids given.

    For the built-in task a bare ``test_data/`` folder (or a root holding only that) is read
    as before tasks: its ``img_*.png`` files.
    """
    task = task_or_default(task, where)
    if not isinstance(where, (str, os.PathLike)):
        return expected_test_ids(where)
    if task == default_task():
        try:
            return expected_test_ids(where, task=task)
        except KitError:  # a test folder alone, as the checks before a submit may be given
            return expected_test_ids(where)
    return expected_test_ids(where, task=task)


test_ids.__test__ = False  # not a test, whatever pytest makes of its name


def test_folder(task: Task) -> str:
    """Where the task's test images are, as messages name it (``test_data/`` for AN2DL)."""
    folder = pattern_folder(task.images.test)
    return f"{folder}/" if folder else "the data folder"


test_folder.__test__ = False


def manifest_task(manifest: dict, where="manifest") -> Task:
    """The task a manifest was made for: its recorded ``task.definition``, checked; the
    built-in AN2DL task for a manifest written before manifests recorded one."""
    recorded = manifest.get("task")
    if not recorded:
        return default_task()
    if recorded.get("fingerprint") == default_task().fingerprint:
        return default_task()
    return parse_task(recorded.get("definition"), source=f"{where} (task)")


def labels_source(task: Task) -> str:
    """What the manifest's ``train_labels_sha256`` hashes for ``task``."""
    if task.layout == "csv":
        return task.labels.file
    return f"sorted id,label listing of {task.images.train}"


def train_labels_digest(data, task: Task) -> tuple[str | None, str]:
    """``(sha256, what it hashes)`` of the training labels: the labels file's bytes (None
    when it is missing), or with the folders layout, where no file holds them, the sorted
    ``id,label`` lines of the training images the task finds.

    Raises
    ------
    KitError
        No dataset at ``data``; with the folders layout, a dataset the task cannot list.
    """
    source = labels_source(task)
    root = find_root(data, task)
    if task.layout == "csv":
        path = root / task.labels.file
        return (sha256_file(path) if path.is_file() else None), source
    train = load_dataset(root, check_pixels=False, task=task).train
    lines = sorted(f"{s.id},{s.label}" for s in train)
    return sha256_text("\n".join(lines) + "\n"), source
