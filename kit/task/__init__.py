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
from kit.task.errors import format_errors
from kit.task.load import (
    DEFAULT_TASK,
    TASK_FILE,
    TASKS_DIR,
    Data,
    as_data,
    builtin_tasks,
    default_task,
    find_task_file,
    load_task,
    parse_task,
    read_task,
    task_of,
)
from kit.task.model import (
    JUNK_DETECTORS,
    SPLITS,
    CsvLabels,
    FolderLabels,
    Labels,
    SplitPaths,
    SubmissionColumns,
    Task,
)
from kit.task.patterns import (
    ID,
    LABEL,
    pattern_fields,
    pattern_folder,
    pattern_glob,
    pattern_regex,
    squash,
)

__all__ = [
    "DEFAULT_TASK", "ID", "JUNK_DETECTORS", "LABEL", "SPLITS", "TASKS_DIR", "TASK_FILE",
    "CsvLabels", "Data", "FolderLabels", "Labels", "SplitPaths", "SubmissionColumns", "Task",
    "as_data", "builtin_tasks", "default_task", "find_task_file", "format_errors", "load_task",
    "parse_task", "pattern_fields", "pattern_folder", "pattern_glob", "pattern_regex",
    "read_task", "squash", "task_of",
]
