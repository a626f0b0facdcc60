"""Re-run a blend from its manifest and check that the CSV comes out byte-identical.

The manifest stores the backbones, objective, views flag, seed and resolved search config,
the task (its fingerprint) and the sha256 of every file the blend read. ``reproduce`` fits the
blend again for the dataset's task from the same
files under ``runs/`` (nothing under ``submissions/`` or ``runs/blend/`` is touched), writes
the CSV in a temporary folder and compares bytes; on a mismatch it says which inputs changed
and which rows differ.
"""
from __future__ import annotations

import csv
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kit import __version__
from kit.data.dataset import find_root
from kit.ensemble.blend import fit_blend
from kit.paths import Paths
from kit.submission.package import load_manifest, test_files_sha256, write_submission
from kit.submission.task_data import manifest_task, test_folder, test_ids, train_labels_digest
from kit.task import Task, as_data
from kit.utils import KitError, atomic_write_bytes, package_versions, sha256_bytes, sha256_file

MAX_ROWS = 20  # differing rows listed one by one; the rest are counted


@dataclass
class ReproduceReport:
    """Outcome: ``identical`` and, line by line, what differs (``notes`` never fail it)."""

    identical: bool
    recorded_csv: Path
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def infer_workdir(manifest_path: Path, manifest: dict) -> Path:
    """``<workdir>/submissions/x.json`` -> ``<workdir>``; elsewhere the recorded workdir."""
    manifest_path = Path(manifest_path).resolve()
    if manifest_path.parent.name == "submissions":
        return manifest_path.parent.parent
    return Path(manifest["workdir"])


def run_reproduce(paths: Paths | None, data, cfg: dict | None, *, manifest, out=None,
                  default_data=None, task=None) -> ReproduceReport:
    """Re-run the blend a manifest describes and compare its CSV with the recorded one.

    Parameters
    ----------
    paths : Paths or None
        The work directory whose ``runs/`` the blend reads again; None: inferred from the
        manifest (:func:`infer_workdir`).
    data : Data, path or None
        Dataset root (and its task); None: the root recorded in the manifest if it still
        exists, else ``default_data``.
    cfg : None
        Reproduce has no settings of its own (the blend's come from the manifest); the
        argument keeps the one form of every stage, ``run_<stage>(paths, data, cfg)``.
    manifest : path
        ``submissions/<time>_<name>.json`` (or ``latest.json``).
    out : path, optional
        Also write the reproduced CSV there.
    task : Task, str or None
        The task of a dataset root given as a path (``--task``; default its ``task.yaml``,
        else the built-in one). A task whose fingerprint is not the manifest's (the built-in
        one for a manifest that records none) is a difference.
    """
    manifest_path = Path(manifest)
    m = load_manifest(manifest_path)
    if paths is None:
        paths = Paths.from_root(infer_workdir(manifest_path, m))
    if data is None:
        data = m["data"]["root"] if Path(m["data"]["root"]).is_dir() else default_data
    if data is None:
        raise KitError(f"{manifest_path}: the recorded dataset {m['data']['root']} is gone; "
                       "pass --data to the dataset root")
    data = as_data(data, task)
    report = ReproduceReport(False, manifest_path.parent / m["files"]["csv"])
    report.differences += _task_changes(manifest_path, m, data.task)
    report.differences += _input_changes(paths, m) + _data_changes(paths, data, m)
    recorded = _recorded_csv(report, m)
    b = m["blend"]
    try:
        result = fit_blend(paths, data, b["params"], backbones=b["backbones"], name=m["name"],
                           objective=b["objective"], weight_views=b["weight_views"],
                           seed=b["seed"])
        with tempfile.TemporaryDirectory() as tmp:
            new_path = Path(tmp) / m["files"]["csv"]
            write_submission(result.submission_frame(), new_path, result.inputs.test_ids,
                             task=data.task)
            new = new_path.read_bytes()
    except KitError as exc:
        report.differences.append(f"the blend could not be re-run: {exc}")
        report.differences += [f"  {p}" for p in exc.problems]
        return report
    if out is not None:
        atomic_write_bytes(out, new)
    extra = sorted(set(result.inputs.files) - set(m["inputs"]))
    report.differences += [f"input {p}: read now but not by the recorded blend (new file)"
                           for p in extra]
    report.identical = (new == recorded) if recorded is not None \
        else sha256_bytes(new) == m["csv_sha256"]
    if not report.identical:
        report.differences += _param_changes(m, result)
        report.differences += _row_changes(recorded, new) if recorded is not None else [
            f"reproduced CSV sha256 {sha256_bytes(new)[:12]} differs from the recorded "
            f"{m['csv_sha256'][:12]}"]
    report.notes += _environment_changes(m)
    return report


def _input_changes(paths: Paths, m: dict) -> list[str]:
    out = []
    for rel, digest in sorted(m["inputs"].items()):
        path = Path(rel) if Path(rel).is_absolute() else paths.root / rel
        if not path.is_file():
            out.append(f"input {rel}: missing now (recorded sha256 {digest[:12]})")
        elif (now := sha256_file(path)) != digest:
            out.append(f"input {rel}: changed (sha256 {digest[:12]} -> {now[:12]})")
    return out


def _task_changes(manifest_path: Path, m: dict, task: Task) -> list[str]:
    """The task the manifest was made for against the dataset's now (fingerprints)."""
    then = m.get("task") or {}
    try:
        recorded = manifest_task(m, manifest_path)
    except KitError as exc:
        return [f"task: {exc}"]
    if recorded == task:
        return []
    name = then.get("name") or recorded.name
    return [f"task: made for {name} ({recorded.fingerprint[:12]}), the dataset's is {task.name} "
            f"({task.fingerprint[:12]}"
            + (f", from {task.source}" if task.source else "") + "); pass --task or --data "
            "for the one it was made for"]


def _data_changes(paths: Paths, data, m: dict) -> list[str]:
    out = []
    task = data.task
    try:
        root = find_root(data, task)
    except KitError as exc:
        return [f"dataset: {exc}"]
    try:
        labels_now, source = train_labels_digest(root, task)
    except KitError as exc:
        labels_now, source = None, f"training labels ({exc})"
    try:
        ids_now = test_files_sha256(test_ids(root, task))
    except KitError:
        ids_now = None
    checks = [
        (str(root / source) if task.layout == "csv" else f"{root}: {source}",
         m["data"]["train_labels_sha256"], labels_now),
        (f"test file list of {root / test_folder(task)}", m["data"]["test_files_sha256"],
         ids_now),
        (str(paths.folds_csv), m["folds_sha256"], _sha_or_none(paths.folds_csv)),
        (str(paths.outliers_csv), m["outliers_sha256"], _sha_or_none(paths.outliers_csv)),
    ]
    for what, then, now in checks:
        if then != now:
            out.append(f"{what}: {'missing now' if now is None else 'changed'} "
                       f"(sha256 {str(then)[:12]} -> {str(now)[:12]})")
    return out


def _sha_or_none(path: Path):
    return sha256_file(path) if path.is_file() else None


def _recorded_csv(report: ReproduceReport, m: dict) -> bytes | None:
    path = report.recorded_csv
    if not path.is_file():
        report.differences.append(f"{path}: recorded CSV missing; comparing with the sha256 in "
                                  "the manifest only")
        return None
    data = path.read_bytes()
    if sha256_bytes(data) != m["csv_sha256"]:
        report.differences.append(f"{path}: edited after the blend wrote it (sha256 "
                                  f"{sha256_bytes(data)[:12]}, manifest says "
                                  f"{m['csv_sha256'][:12]})")
    return data


def _param_changes(m: dict, result) -> list[str]:
    out = []
    for what, then, now in (("weight", m["blend"]["weights"], result.weights),
                            ("class bias", m["blend"]["biases"], result.biases)):
        for key in sorted(set(then) | set(now)):
            a, b = then.get(key), now.get(key)
            if a is None or b is None or abs(a - b) > 1e-9:
                out.append(f"{what} {key}: recorded {_fmt(a)}, reproduced {_fmt(b)}")
    return out


def _fmt(v) -> str:
    return "absent" if v is None else f"{v:.6f}"


def _rows(data: bytes) -> tuple[list[str], dict[str, str]]:
    records = list(csv.reader(io.StringIO(data.decode("utf-8", errors="replace"), newline="")))
    header = records[0] if records else []
    return header, {r[0]: (r[1] if len(r) > 1 else "") for r in records[1:] if r}


def _row_changes(recorded: bytes, new: bytes) -> list[str]:
    (h_old, old), (h_new, rows) = _rows(recorded), _rows(new)
    out = [] if h_old == h_new else [f"header: recorded {','.join(h_old)!r}, "
                                     f"reproduced {','.join(h_new)!r}"]
    diff = [f"row {sid}: recorded {old[sid]!r}, reproduced {rows[sid]!r}"
            for sid in sorted(set(old) & set(rows)) if old[sid] != rows[sid]]
    diff += [f"row {sid}: only in the recorded CSV" for sid in sorted(set(old) - set(rows))]
    diff += [f"row {sid}: only in the reproduced CSV" for sid in sorted(set(rows) - set(old))]
    if len(diff) > MAX_ROWS:
        diff = diff[:MAX_ROWS] + [f"... and {len(diff) - MAX_ROWS} more differing rows"]
    if not diff and not out:
        out.append("same rows and labels, different bytes (line endings, quoting or row order)")
    return out + diff


def _environment_changes(m: dict) -> list[str]:
    notes = []
    if m["kit"]["version"] != __version__:
        notes.append(f"kit version {m['kit']['version']} recorded, {__version__} now")
    now = package_versions()
    for name, then in sorted(m["versions"].items()):
        if now.get(name, then) != then:
            notes.append(f"package {name}: {then} recorded, {now[name]} now")
    return notes
