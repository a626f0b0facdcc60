"""What a fitted blend leaves: the submission CSV and its manifest, ``latest.*``, and
``runs/blend/`` for the report (:func:`run_blend`); :mod:`kit.ensemble.blend` fits, this writes."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from kit.data.dataset import find_root
from kit.ensemble.blend import NAME_RE, BlendResult, fit_blend, fold_fit_record
from kit.paths import Paths
from kit.submission.ledger import write_ledger
from kit.submission.package import (
    build_manifest,
    command_line,
    write_submission,
)
from kit.submission.shakeup import nested_oof_path, shakeup_record, write_nested_oof
from kit.submission.task_data import train_labels_digest
from kit.task import as_data
from kit.utils import (
    KitError,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    sha256_file,
    write_config,
)


def run_blend(paths: Paths, data, cfg: dict, *, backbones=None, name: str = "blend",
              objective: str = "f1", weight_views: bool = False, seed: int = 42,
              command: str | None = None) -> BlendResult:
    """Fit the blend for the task of ``data`` and write the submission, its manifest,
    ``latest.*`` and ``runs/blend/``.

    The submission has the task's columns and class strings, one row per test id; the
    manifest records the task and its metric, in which the scores are. Writes
    ``submissions/<UTC YYYYmmdd-HHMMSS>_<name>.csv`` and ``.json``, then
    ``submissions/latest.csv`` and ``latest.json`` as atomic *copies* (not symlinks: those
    need privileges on Windows, break on some network/FUSE mounts and in zipped Kaggle
    outputs, and ``kaggle ... -f submissions/latest.csv`` must read a real file); and
    ``runs/blend/{config.yaml,blend.json,oof_blend.csv,test_blend.csv}`` for the report.
    """
    if not NAME_RE.match(name) or name == "latest":
        raise KitError(f"--name {name!r}: use letters, digits, '_', '-' or '.', not 'latest'")
    data = as_data(data)
    task = data.task
    result = fit_blend(paths, data, cfg, backbones, name, objective, weight_views, seed)
    labels_sha, labels_source = train_labels_digest(data, task)
    stamp = datetime.now(timezone.utc)
    csv_path = _free_name(paths.submissions_dir, f"{stamp:%Y%m%d-%H%M%S}_{name}")
    digest = write_submission(result.submission_frame(), csv_path, result.inputs.test_ids,
                              task=task)
    manifest = build_manifest(
        name=name, csv_path=csv_path, csv_sha256=digest, csv_rows=len(result.test_labels),
        command=command or command_line(), workdir=paths.root,
        data_root=find_root(data, task).resolve(), train_labels_sha256=labels_sha,
        train_labels_source=labels_source, task=task, test_ids=result.inputs.test_ids,
        folds_sha256=result.inputs.folds_sha256,
        outliers_sha256=sha256_file(paths.outliers_csv) if paths.outliers_csv.exists() else None,
        backbones=result.inputs.meta, inputs=result.inputs.files, blend=result.blend_record(),
        scores=result.scores, seed=seed, created_utc=stamp.isoformat(timespec="seconds"),
        expected_score=result.expected)
    manifest["expected_ci95"] = result.expected_ci95  # beside expected_score
    # The nested OOF predictions, kept per submission: they estimate its public/private
    # shake-up here, and let `choose` compare two submissions on the same images later.
    # Written before the manifest, so that a manifest never points at a missing file.
    classes = task.classes
    write_nested_oof(nested_oof_path(csv_path), result.inputs.ids,
                     [classes[i] for i in result.inputs.y],
                     [classes[i] for i in result.search.pred_nested])
    manifest["shakeup"] = shakeup_record(result.inputs.y, result.search.pred_nested,
                                         task.metric, classes,
                                         n_test=len(result.inputs.test_ids),
                                         public_fraction=getattr(task, "public_fraction", None))
    manifest_path = csv_path.with_suffix(".json")
    atomic_write_json(manifest_path, manifest)
    result.csv_path, result.manifest_path, result.csv_sha256 = csv_path, manifest_path, digest
    result.latest_csv = atomic_write_bytes(paths.submissions_dir / "latest.csv",
                                           csv_path.read_bytes())
    result.latest_manifest = atomic_write_json(paths.submissions_dir / "latest.json", manifest)
    _write_run_dir(paths, result)
    write_ledger(paths, task)
    return result


def _free_name(folder: Path, stem: str) -> Path:
    """``folder/stem.csv``, or ``stem-2.csv``... when a blend of the same second exists."""
    path, n = folder / f"{stem}.csv", 1
    while path.exists() or path.with_suffix(".json").exists():
        n += 1
        path = folder / f"{stem}-{n}.csv"
    return path


def _write_run_dir(paths: Paths, result: BlendResult) -> None:
    out = paths.runs_dir / "blend"
    write_config(out / "config.yaml", {**result.cfg, "backbones": result.inputs.backbones,
                                       "objective": result.objective, "name": result.name,
                                       "weight_views": result.weight_views, "seed": result.seed})
    atomic_write_json(out / "blend.json", {
        **result.blend_record(), "scores": result.scores,
        "expected_score": result.expected, "expected_ci95": result.expected_ci95,
        "inputs_provenance": {bb: {k: m.get(k) for k in ("honest", "epochs", "params", "why",
                                                          "training_path")}
                              for bb, m in result.inputs.meta.items()},
        "folds_sha256": result.inputs.folds_sha256,
        "fold_fits": {k: fold_fit_record(result.inputs.models, f, result.task.classes)
                      for k, f in result.search.fold_fits.items()},
        "submission": str(result.csv_path), "manifest": str(result.manifest_path),
        "csv_sha256": result.csv_sha256})
    s, ids = result.search, result.inputs
    classes, columns = result.task.classes, result.task.prob_columns
    # Internal files keep the kit's column names (sample_index, p_<class>), whatever the task.
    oof = pd.DataFrame({"sample_index": ids.ids, "fold": ids.folds,
                        "label": [classes[i] for i in ids.y]})
    oof[columns] = s.oof_probs
    oof[[f"nested_{c}" for c in columns]] = s.nested_probs
    oof["pred"] = [classes[i] for i in s.pred_in_sample]
    oof["pred_nested"] = [classes[i] for i in s.pred_nested]
    atomic_write_csv(out / "oof_blend.csv", oof, float_format="%.6f")
    test = pd.DataFrame({"sample_index": ids.test_ids})
    test[columns] = result.test_probs
    test["label"] = result.test_labels
    atomic_write_csv(out / "test_blend.csv", test, float_format="%.6f")
