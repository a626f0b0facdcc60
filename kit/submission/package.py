"""The submission CSV (validated before it exists) and the manifest that makes it reproducible.

``write_submission`` refuses to write a file Kaggle would reject or mis-score, checked against
the task (the built-in AN2DL one by default): header exactly the task's submission columns
(``sample_index,label`` for AN2DL), one row per test image the task's ``images.test`` finds,
label strings exactly the task's classes, no empty values, rows sorted by id. The manifest
(``submissions/<name>.json``) records everything needed to re-run the blend and to tell
later whether its inputs changed, the task included; ``update_manifest``/
``append_submission`` edit it with an atomic read-modify-write so that the submit step can
add its upload records.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
from filelock import FileLock

from kit import __version__
from kit.artifacts import missing_manifest_fields, read_manifest
from kit.data.dataset import expected_test_ids  # noqa: F401 (the submission's test ids)
from kit.submission.task_data import labels_source, task_or_default, test_folder, test_ids
from kit.task import Task, default_task
from kit.utils import (
    KitError,
    atomic_path,
    atomic_write_json,
    package_versions,
    sha256_file,
    sha256_text,
)

COLUMNS = ("sample_index", "label")  # the built-in task's submission header
HEADER = ",".join(COLUMNS)
MAX_LISTED = 20  # per kind of problem; the rest is summarised in one line
MANIFEST_VERSION = 1
LATEST = "latest"

# ----------------------------------------------------------------------------- submission CSV

def test_files_sha256(ids: Iterable[str]) -> str:
    """sha256 of the sorted test file names, one per line: identifies the test set."""
    return sha256_text("\n".join(sorted(ids)) + "\n")


test_files_sha256.__test__ = False  # not a test, whatever pytest makes of its name


def validate_submission(df_or_path, test_dir_or_ids, classes=None, *,
                        task: Task | None = None) -> list[str]:
    """Every problem of a submission, one line each naming the row; empty list if valid.

    Parameters
    ----------
    df_or_path : DataFrame or path
        The submission (a file is checked as Kaggle reads it: raw header line, CSV fields).
    test_dir_or_ids : path, Data or iterable of str
        The dataset root (or for AN2DL ``test_data/``), or the expected test ids.
    classes : iterable of str, optional
        The allowed label strings (default: the task's classes).
    task : Task, optional
        What the file must follow: its submission columns, classes and test images (default:
        the task of a :class:`~kit.task.Data` given, else the built-in AN2DL task).
    """
    task = task_or_default(task, test_dir_or_ids)
    expected = test_ids(test_dir_or_ids, task)
    columns = task.submission_columns
    if isinstance(df_or_path, pd.DataFrame):
        header, rows = _frame_rows(df_or_path)
    else:
        header, rows = _file_rows(Path(df_or_path))
    problems = []
    if header != list(columns):
        problems.append(f"header is {','.join(header)!r}, expected exactly "
                        f"{','.join(columns)!r}")
    problems += _row_problems(rows, expected, tuple(task.classes if classes is None else classes),
                              columns, test_folder(task))
    return problems


def _frame_rows(df: pd.DataFrame) -> tuple[list[str], list[tuple[int, list[str]]]]:
    rows = []
    for i, values in enumerate(df.itertuples(index=False, name=None)):
        rows.append((i + 2, ["" if _is_missing(v) else str(v) for v in values]))
    return [str(c) for c in df.columns], rows


def _is_missing(v) -> bool:
    try:
        return v is None or bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _file_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise KitError(f"{path}: submission file not found") from None
    except UnicodeDecodeError as exc:
        raise KitError(f"{path}: not UTF-8 text ({exc}); write the CSV as UTF-8") from None
    records = list(csv.reader(io.StringIO(text, newline="")))
    if not records:
        return [], []
    # A BOM would make Kaggle's header 'ï»¿sample_index': keep it visible in the header check.
    return records[0], [(i + 2, r) for i, r in enumerate(records[1:])]


def _row_problems(rows, expected: list[str], classes: tuple[str, ...],
                  columns=COLUMNS, folder: str = "test_data/") -> list[str]:
    problems, seen, lines_of = [], set(), {}
    expected_set = set(expected)
    kinds: dict[str, list[str]] = {"shape": [], "empty": [], "label": [], "extra": []}
    for line, fields in rows:
        if len(fields) != len(columns):
            kinds["shape"].append(f"line {line}: {len(fields)} fields, expected {len(columns)} "
                                  f"({','.join(columns)})")
            continue
        sid, label = fields
        if sid == "" or label == "":
            empty = [c for c, v in zip(columns, fields) if v == ""]
            kinds["empty"].append(f"line {line}: empty {' and '.join(empty)}"
                                  + (f" ({columns[0]} {sid})" if sid else ""))
        if label != "" and label not in classes:
            kinds["label"].append(f"line {line}: unknown label {label!r} for {sid or '?'}; "
                                  f"allowed: {', '.join(classes)}")
        if sid == "":
            continue
        lines_of.setdefault(sid, []).append(line)
        if sid not in expected_set:
            kinds["extra"].append(f"line {line}: extra row {sid}: no such image in {folder}")
        seen.add(sid)
    for kind in ("shape", "empty", "label", "extra"):
        problems += _capped(kinds[kind], kind)
    dups = [f"duplicate {sid} on lines {', '.join(map(str, lines))}; keep one row per test image"
            for sid, lines in sorted(lines_of.items()) if len(lines) > 1]
    problems += _capped(dups, "duplicate")
    missing = [f"missing row for {sid} (in {folder} but not in the CSV)"
               for sid in expected if sid not in seen]
    problems += _capped(missing, "missing")
    ids = [(line, f[0]) for line, f in rows if len(f) == len(columns) and f[0] != ""]
    for (prev_line, prev), (line, sid) in zip(ids, ids[1:]):
        if sid < prev:
            problems.append(f"rows not sorted by {columns[0]}: line {line} ({sid}) comes after "
                            f"line {prev_line} ({prev}); sort the rows")
            break
    return problems


def _capped(lines: list[str], kind: str) -> list[str]:
    if len(lines) <= MAX_LISTED:
        return lines
    return lines[:MAX_LISTED] + [f"... and {len(lines) - MAX_LISTED} more {kind} problems"]


def write_submission(df: pd.DataFrame, path, expected_ids, classes=None, *,
                     task: Task | None = None) -> str:
    """Validate ``df`` and write it to ``path`` atomically; return the file's sha256.

    The frame is checked (:func:`validate_submission`, against ``task``), written to a
    temporary file beside ``path``, the file re-checked as Kaggle will read it, and only then
    renamed onto ``path``. Any failed check leaves ``path`` untouched (nothing new is written).

    Raises
    ------
    KitError
        Listing every problem row.
    """
    path = Path(path)
    task = task_or_default(task, expected_ids)
    if not isinstance(expected_ids, (str, os.PathLike)):
        expected_ids = list(expected_ids)  # read twice below
    problems = validate_submission(df, expected_ids, classes, task=task)
    if problems:
        raise KitError(f"{path}: submission not written, {len(problems)} problems", problems)
    with atomic_path(path) as tmp:
        df.loc[:, list(task.submission_columns)].to_csv(tmp, index=False, lineterminator="\n")
        problems = validate_submission(tmp, expected_ids, classes, task=task)
        if problems:  # e.g. a value CSV quoting changed; never rename a bad file into place
            raise KitError(f"{path}: submission not written, {len(problems)} problems "
                           "in the written file", problems)
        digest = sha256_file(tmp)
    return digest


# ----------------------------------------------------------------------------- manifest

def git_info(repo_dir: str | os.PathLike | None = None) -> dict:
    """Commit and dirty flag of the kit's own checkout; ``commit`` is None outside git.

    Dirty means ``git status --porcelain`` lists anything (modified or untracked files that
    .gitignore does not cover), i.e. the code that ran may not be the commit.
    """
    repo = Path(repo_dir) if repo_dir else Path(__file__).resolve().parents[2]

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            reason = (head.stderr.strip().splitlines() or ["git rev-parse failed"])[0]
            return {"commit": None, "dirty": None, "note": f"not a git repository ({reason})"}
        status = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError) as exc:
        return {"commit": None, "dirty": None, "note": f"git not available ({exc})"}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()),
            "note": None if status.returncode == 0 else status.stderr.strip()}


def command_line(argv: list[str] | None = None) -> str:
    """The command as the user typed it (``./run.sh blend ...`` for ``python -m kit``)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "kit":
        argv = ["./run.sh"] + argv[1:]
    return shlex.join(argv)


def build_manifest(*, name: str, csv_path, csv_sha256: str, csv_rows: int, command: str,
                   workdir, data_root, train_labels_sha256: str, test_ids: list[str],
                   folds_sha256: str, outliers_sha256: str | None, backbones: dict,
                   inputs: dict, blend: dict, scores: dict, seed: int,
                   created_utc: str | None = None, expected_score: dict | None = None,
                   task: Task | None = None, train_labels_source: str | None = None) -> dict:
    """Assemble a submission manifest (plain JSON types); its keys: kit.artifacts.MANIFEST_FIELDS.

    Besides those it records ``task`` (``name``, ``fingerprint``, ``definition``: the task's
    keys; :func:`kit.submission.task_data.manifest_task` reads it back), ``metric`` (the
    task's metric, which ``scores`` and ``expected_score`` are in) and
    ``data.train_labels_source`` (what ``train_labels_sha256`` hashes:
    :func:`kit.submission.task_data.train_labels_digest`).

    Parameters
    ----------
    backbones : dict
        ``{name: {"config", "weights_source", "oof_macro_f1", "folds_sha256", ...}}``, and
        how each input chose its epochs and params: ``selection`` and ``params_source``
        (from its metrics.json), ``epochs`` and ``params`` in words, ``honest`` and ``why``
        (:func:`kit.ensemble.blend.provenance`).
    inputs : dict
        ``{path relative to workdir: sha256}`` of every file the blend read.
    blend : dict
        ``backbones``, ``objective``, ``weight_views``, ``models``, ``weights``, ``biases``,
        ``params`` (resolved search config), ``seed``: enough to re-run it.
    scores : dict
        ``nested``, ``in_sample`` (each with ``macro_f1`` and ``per_class_f1``), ``baselines``.
    expected_score : dict, optional
        The nested score and what it is worth: ``metric``, ``score`` (in it), ``macro_f1``,
        ``honest``, ``label`` (``expected`` | ``optimistic``), ``why`` (backbone ->
        reasons); older manifests lack it.
    task : Task, optional
        The task the submission is for (default: the built-in AN2DL task).
    train_labels_source : str, optional
        What ``train_labels_sha256`` is the hash of (default: the task's labels file).
    """
    csv_path = Path(csv_path)
    task = default_task() if task is None else task
    if train_labels_source is None:
        train_labels_source = labels_source(task)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "kit": {"version": __version__, "git": git_info()},
        "created_utc": created_utc or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "name": name,
        "files": {"csv": csv_path.name, "manifest": csv_path.with_suffix(".json").name},
        "csv_sha256": csv_sha256,
        "csv_rows": int(csv_rows),
        "data": {"root": str(data_root), "train_labels_sha256": train_labels_sha256,
                 "train_labels_source": train_labels_source,
                 "test_files_sha256": test_files_sha256(test_ids), "n_test": len(test_ids)},
        "task": {"name": task.name, "fingerprint": task.fingerprint,
                 "definition": task.to_dict()},
        "metric": task.metric,
        "folds_sha256": folds_sha256,
        "outliers_sha256": outliers_sha256,
        "backbones": backbones,
        "inputs": dict(sorted(inputs.items())),
        "blend": blend,
        "scores": scores,
        "expected_score": expected_score,
        "seeds": {"blend": int(seed)},
        "versions": package_versions(),
        "workdir": str(workdir),
        "submissions": [],
    }
    missing = missing_manifest_fields(manifest)
    if missing:  # a programming error, not user input
        raise ValueError(f"manifest incomplete: {missing}")
    return json.loads(json.dumps(manifest, default=_json_default))


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def load_manifest(path) -> dict:
    """Read a manifest, refusing a missing, unparsable or incomplete one: the one reader,
    :func:`kit.artifacts.read_manifest`, for any task's classes."""
    return read_manifest(path, classes=None)


def _locked(path: Path) -> FileLock:
    """Exclusive lock around a read-modify-write of ``path`` (``.<name>.lock`` beside it; a
    ``filelock.FileLock``, so it holds on every OS)."""
    return FileLock(path.parent / f".{path.name}.lock")


def modify_manifest(path, change: Callable[[dict], None]) -> dict:
    """Apply ``change`` (edits the dict in place) to a manifest, atomically and under a lock.

    ``submissions/latest.json`` is a copy of the newest manifest: editing it edits the
    original ``<time>_<name>.json``, and editing the original refreshes ``latest.json`` while
    it mirrors that manifest, so the two never disagree.
    """
    path = Path(path)
    manifest = load_manifest(path)
    original = path.parent / manifest["files"]["manifest"]
    target = original if original.exists() else path
    with _locked(target):
        manifest = load_manifest(target)
        change(manifest)
        atomic_write_json(target, manifest)
        latest = target.parent / f"{LATEST}.json"
        if latest != target and latest.exists():
            try:
                mirrors = json.loads(latest.read_text())["files"]["manifest"] == target.name
            except (ValueError, KeyError, TypeError):
                mirrors = False
            if mirrors:
                atomic_write_json(latest, manifest)
    return manifest


def update_manifest(path, **fields: Any) -> dict:
    """Set top-level ``fields`` of a manifest (atomic read-modify-write); return it."""

    def change(manifest):
        manifest.update(json.loads(json.dumps(fields, default=_json_default)))

    return modify_manifest(path, change)


def append_submission(path, record: dict) -> dict:
    """Append one upload record (or failure) to the manifest's ``submissions`` list."""

    def change(manifest):
        manifest.setdefault("submissions", []).append(
            json.loads(json.dumps(record, default=_json_default)))

    return modify_manifest(path, change)
