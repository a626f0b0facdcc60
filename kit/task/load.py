"""Finding and reading a task (``--task``, then ``task.yaml`` in the data folder, then the
built-in AN2DL task), and :class:`Data`, the dataset root with its task that stages take."""
from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from pydantic import ValidationError

from kit import DEFAULT_TASK
from kit.task.errors import format_errors
from kit.task.model import Task
from kit.utils import KitError, read_yaml

TASKS_DIR = Path(__file__).resolve().parent.parent / "conf" / "tasks"
TASK_FILE = "task.yaml"  # looked for at the root of the data folder


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
    if isinstance(data, (str, os.PathLike)):  # (a Path's own .root is "/": not that one)
        root, own = Path(data), None
    else:  # a loaded kit.data.dataset.Dataset: its root and task
        root, own = Path(data.root), getattr(data, "task", None)
    return Data(root, load_task(task if task is not None else own, root))


def task_of(data) -> Task:
    """The task of ``data`` (a :class:`Data`, a dataset root, or None: the built-in task)."""
    if data is None:
        return default_task()
    return as_data(data).task
