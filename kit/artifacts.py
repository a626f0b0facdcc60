"""One reader per file the stages exchange (docs/DESIGN.md, Files).

Each reader checks its file once, the same way for every stage that reads it, and refuses a
malformed one with one line, ``KitError("<path>: <what is wrong>; <the fix>")``. The class
list is a keyword argument (default :data:`kit.CLASSES`), so that a task with other classes
reads the same files with the same checks.

- :func:`read_oof`: ``runs/<run>/oof.csv`` (and a fold's or a TTA view's file of that format)
- :func:`read_test`: ``runs/<run>/test.csv`` (likewise)
- :func:`read_metrics`: ``runs/<run>/metrics.json`` (:func:`run_score`: the score it gives)
- :func:`read_folds`: ``folds/folds.csv``
- :func:`read_manifest`: a submission's ``.json`` manifest
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from kit import CLASSES
from kit.utils import KitError, sha256_bytes

OOF_COLUMNS = ("sample_index", "fold", "label")
TEST_COLUMNS = ("sample_index",)
FOLDS_COLUMNS = ("sample_index", "label", "fold", "group")
OLD_FOLDS_COLUMNS = FOLDS_COLUMNS[:3]  # before images were grouped: still read
# Top-level manifest fields (and the nested ones that must be there): a manifest that
# cannot be reproduced is caught when it is read.
MANIFEST_FIELDS = {
    "manifest_version": (),
    "kit": ("version", "git"),
    "created_utc": (),
    "command": (),
    "name": (),
    "files": ("csv", "manifest"),
    "csv_sha256": (),
    "csv_rows": (),
    "data": ("root", "train_labels_sha256", "test_files_sha256", "n_test"),
    "folds_sha256": (),
    "outliers_sha256": (),
    "backbones": (),
    "inputs": (),
    "blend": ("backbones", "objective", "weight_views", "models", "weights", "biases", "params",
              "seed"),
    "scores": ("nested", "in_sample", "baselines"),
    "seeds": (),
    "versions": (),
    "workdir": (),
    "submissions": (),
}


def prob_columns(classes=CLASSES) -> list[str]:
    """``p_`` + each class label, in class order: the probability columns of OOF/test files."""
    return [f"p_{c}" for c in classes]


# --------------------------------------------------------------------------- cv outputs
def read_oof(path, *, classes=CLASSES) -> pd.DataFrame:
    """An OOF file (``sample_index,fold,label,p_<class>...``), indexed by ``sample_index``.

    Returns
    -------
    DataFrame
        ``fold`` (int64), ``label`` (the label string), one float64 column per class, in
        the file's row order.

    Raises
    ------
    KitError
        Missing or unreadable file, missing columns, no rows, a repeated image, a fold that
        is not a non-negative integer, an unknown label, or probabilities that are missing,
        not numbers, negative or all zero in a row.
    """
    path = Path(path)
    fix = f"rerun ./run.sh cv {_run_name(path)}"
    probs = prob_columns(classes)
    df = _read_probs(path, [*OOF_COLUMNS, *probs], fix)
    if not pd.api.types.is_integer_dtype(df.fold) or (df.fold < 0).any():
        raise KitError(f"{path}: fold values are not all non-negative integers; {fix}")
    unknown = sorted(set(df.label) - set(classes))
    if unknown:
        raise KitError(f"{path}: unknown label {unknown[0]!r} (expected one of "
                       f"{', '.join(classes)}); {fix}")
    return df.set_index("sample_index")


def read_test(path, *, classes=CLASSES) -> pd.DataFrame:
    """A test-probability file (``sample_index,p_<class>...``), indexed by ``sample_index``,
    one float64 column per class, in the file's row order.

    Raises
    ------
    KitError
        As :func:`read_oof`, for the columns a test file has.
    """
    path = Path(path)
    df = _read_probs(path, [*TEST_COLUMNS, *prob_columns(classes)],
                     f"rerun ./run.sh cv {_run_name(path)}")
    return df.set_index("sample_index")


def read_metrics(path, *, classes=CLASSES, metric: str | None = None) -> dict:
    """A cv run's ``metrics.json``.

    ``metric`` (a task's metric name), when given, must be the one the run was scored by:
    its ``metric``, or macro F1 for a file written before runs recorded one.

    Raises
    ------
    KitError
        Missing file, not JSON, not a JSON object, made for other classes (its ``classes``,
        when recorded, differ from ``classes``; None: any classes) or scored by another
        metric.
    """
    path = Path(path)
    fix = f"rerun ./run.sh cv {_run_name(path)}"
    metrics = _read_json(path, fix, "cv metrics file")
    recorded = metrics.get("classes")
    if recorded is not None and classes is not None and list(recorded) != list(classes):
        raise KitError(f"{path}: made for classes {', '.join(map(str, recorded))}, not "
                       f"{', '.join(classes)}; {fix} for this task")
    scored = run_metric(metrics)
    if metric is not None and scored != metric:
        raise KitError(f"{path}: scored by {scored}, not the task's {metric}; {fix} for this "
                       "task (or pass the --task it was made for)")
    return metrics


def run_metric(metrics: dict) -> str:
    """The metric a cv run was scored by: its ``metric``, or macro F1 for a file written
    before runs recorded one (the kit scored nothing else then)."""
    return str(metrics.get("metric") or "macro_f1")


def run_score(metrics: dict) -> tuple[str, float | None, list | None]:
    """``(metric, score, 95 % interval)`` of a cv run's ``metrics.json``: ``oof_score`` in
    its ``metric`` with ``oof_score_ci95``; for a file without ``oof_score`` (written before
    runs named their metric), ``oof_macro_f1`` and its interval."""
    if metrics.get("oof_score") is not None:
        return run_metric(metrics), metrics["oof_score"], metrics.get("oof_score_ci95")
    return "macro_f1", metrics.get("oof_macro_f1"), metrics.get("oof_macro_f1_ci95")


# --------------------------------------------------------------------------- folds
def read_folds(path, *, classes=CLASSES, listed: bool = False) -> tuple[pd.DataFrame, str]:
    """``folds/folds.csv`` and its sha256 (which every stage using the folds records).

    ``listed``: bad rows are reported as ``<path>: N problems; <fix>`` with one line per
    problem (``KitError.problems``, the folds stage's form) instead of the first three inline.

    Returns
    -------
    (DataFrame, str)
        ``sample_index, label, fold[, group]`` as strings but ``fold`` (int64), in file order.

    Raises
    ------
    KitError
        Missing or unreadable file, other columns, no rows, a fold that is not a
        non-negative integer, an unknown label, a repeated image, or a fold with no images.
    """
    path = Path(path)
    if not path.exists():
        raise KitError(f"{path}: not found; run ./run.sh folds first")
    content = path.read_bytes()
    fix = "rerun ./run.sh folds --force to rewrite it"
    try:
        df = pd.read_csv(io.BytesIO(content), dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises several types for unparsable CSV
        raise KitError(f"{path}: cannot be read as CSV ({_first_line(exc)}); {fix}") from exc
    if tuple(df.columns) not in (FOLDS_COLUMNS, OLD_FOLDS_COLUMNS):
        raise KitError(f"{path}: columns are {','.join(map(str, df.columns))}, expected "
                       f"{','.join(FOLDS_COLUMNS)}; {fix}")
    problems = ["no rows"] if df.empty else []
    bad_fold = ~df.fold.str.fullmatch(r"\d+")
    problems += [f"line {i + 2}: fold {v!r} is not a non-negative integer"
                 for i, v in df.fold[bad_fold].items()]
    problems += [f"line {i + 2}: unknown label {v!r}"
                 for i, v in df.label[~df.label.isin(classes)].items()]
    problems += [f"line {i + 2}: {v} listed again"
                 for i, v in df.sample_index[df.sample_index.duplicated()].items()]
    if problems and listed:
        raise KitError(f"{path}: {len(problems)} problems; {fix}", problems)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; ... ({len(problems)} in all)"
                                           if len(problems) > 3 else "")
        raise KitError(f"{path}: {shown}; {fix}")
    df["fold"] = df.fold.astype(np.int64)
    missing = sorted(set(range(int(df.fold.max()) + 1)) - set(df.fold))
    if missing:
        raise KitError(f"{path}: fold(s) {', '.join(map(str, missing))} have no images; {fix}")
    return df, sha256_bytes(content)


# --------------------------------------------------------------------------- submissions
def read_manifest(path, *, classes=CLASSES) -> dict:
    """A submission's manifest (``submissions/<name>.json``, written by ``./run.sh blend``).

    Raises
    ------
    KitError
        Missing file, not JSON, not a JSON object, a required field missing
        (:data:`MANIFEST_FIELDS`), or class biases for other classes than ``classes``
        (None: any classes).
    """
    path = Path(path)
    manifest = _read_json(path, "pass submissions/<name>.json (written by ./run.sh blend)",
                          "manifest")
    missing = missing_manifest_fields(manifest)
    if missing:
        raise KitError(f"{path}: manifest lacks {', '.join(missing)}; it was not written by "
                       "./run.sh blend of this kit version")
    biases = manifest["blend"]["biases"]
    # Sets: manifests are written with sorted keys, so their order is alphabetical.
    if classes is not None and isinstance(biases, dict) and set(biases) != set(classes):
        raise KitError(f"{path}: a blend for classes {', '.join(map(str, biases))}, not "
                       f"{', '.join(classes)}; blend again for these classes")
    return manifest


def missing_manifest_fields(manifest: dict) -> list[str]:
    """Names of the required fields missing from ``manifest`` (``blend.weights`` style)."""
    missing = []
    for key, sub in MANIFEST_FIELDS.items():
        if key not in manifest:
            missing.append(key)
            continue
        if sub and not isinstance(manifest[key], dict):
            missing += [f"{key}.{s}" for s in sub]
            continue
        missing += [f"{key}.{s}" for s in sub if s not in manifest[key]]
    return missing


# --------------------------------------------------------------------------- shared checks
def _run_name(path: Path) -> str:
    """The run a cv output belongs to: ``runs/<run>/``, above any ``fold_<k>/`` or ``tta/``."""
    folder = path.parent
    while folder.name == "tta" or folder.name.startswith("fold_"):
        folder = folder.parent
    return folder.name


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _read_json(path: Path, fix: str, what: str) -> dict:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise KitError(f"{path}: not found; {fix}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise KitError(f"{path}: not valid JSON ({_first_line(exc)}); {fix}") from exc
    if not isinstance(record, dict):
        raise KitError(f"{path}: not a {what} (expected a JSON object); {fix}")
    return record


def _read_probs(path: Path, columns: list[str], fix: str) -> pd.DataFrame:
    """``columns`` of a probability file (``sample_index`` and ``label`` as strings, the
    ``p_`` columns float64), checked: present, rows, one per image, valid probabilities."""
    try:
        # Empty cells stay strings here: a missing probability is refused below, never NaN.
        df = pd.read_csv(path, dtype={"sample_index": str, "label": str}, keep_default_na=False)
    except FileNotFoundError:
        raise KitError(f"{path}: not found; {fix}") from None
    except Exception as exc:  # pandas raises several types for unparsable CSV
        raise KitError(f"{path}: cannot be read as CSV ({_first_line(exc)}); {fix}") from exc
    df.columns = [str(c).strip() for c in df.columns]
    lacking = [c for c in columns if c not in df.columns]
    if lacking:
        raise KitError(f"{path}: missing column(s) {', '.join(lacking)} (expected header "
                       f"{','.join(columns)}); {fix}")
    df = df[columns]
    if df.empty:
        raise KitError(f"{path}: no rows; {fix}")
    dup = df.sample_index[df.sample_index.duplicated()]
    if len(dup):
        raise KitError(f"{path}: {len(dup)} duplicate sample_index values "
                       f"({', '.join(dup.head(5))}); {fix}")
    probs = [c for c in columns if c.startswith("p_")]
    text = [c for c in probs if not pd.api.types.is_numeric_dtype(df[c])]
    if text:
        raise KitError(f"{path}: column {text[0]} holds empty cells or text, not only "
                       f"probabilities; {fix}")
    values = df[probs].to_numpy(np.float64)
    bad = ~np.isfinite(values).all(axis=1) | (values < 0).any(axis=1) | (values.sum(axis=1) <= 0)
    if bad.any():
        lines = ", ".join(str(i + 2) for i in np.flatnonzero(bad)[:10])
        raise KitError(f"{path}: {int(bad.sum())} rows with missing, infinite, negative or "
                       f"all-zero probabilities (lines {lines}); {fix}")
    df[probs] = values
    return df
