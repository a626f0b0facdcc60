"""cv's assembly: once every fold is done with the run's config, the folds' files become the
run's (``oof.csv``, ``test.csv``, ``tta/``, ``attention.csv``, ``label_issues.csv``) and
``metrics.json``, written last."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from kit.artifacts import read_oof, read_test
from kit.metrics import (
    bootstrap_ci,
    classification_summary,
    collapse_reason,
    get_metric,
    macro_f1,
    plot_confusion,
    prob_frame,
    score,
    to_indices,
    weighted_f1,
)
from kit.training import label_issues
from kit.training.cv_run import FLOAT_FORMAT, CVRun
from kit.training.selection import early_stopping_mode, is_honest
from kit.training.settings import pixel_augment_not_applied
from kit.utils import KitError, atomic_write_csv, atomic_write_json, package_versions, write_config

log = logging.getLogger(__name__)


def _read_table(path: Path) -> pd.DataFrame:
    """A fold's attention or label-issues table, as written (nothing read as NaN)."""
    return pd.read_csv(path, dtype={"sample_index": str, "label": str}, keep_default_na=False)


def assemble(ctx: CVRun, marks: dict[int, dict]) -> dict:
    """Fold outputs -> ``oof.csv``, ``test.csv``, ``tta/``, ``metrics.json`` (last).

    The probability columns are the task's classes; every score is the task's metric
    (``metric``, ``oof_score`` with its interval ``oof_score_ci95``, ``per_fold[].score``)
    beside the macro and weighted F1 that metrics.json has always kept.
    """
    out, folds, views, n_folds = ctx.out, ctx.folds, ctx.views, ctx.n_folds
    task = ctx.task
    classes, pcols, metric = task.classes, task.prob_columns, task.metric
    oof_view, test_view = {}, {}
    for v in views:
        parts = [read_oof(out / f"fold_{k}" / "tta" / f"oof_{v}.csv", classes=classes)
                 for k in range(n_folds)]
        oof = pd.concat(parts)
        if len(oof) != len(folds) or set(oof.index) != set(folds.sample_index) \
                or oof.index.duplicated().any():
            raise KitError(f"{out}: fold predictions do not cover every image of "
                           f"{ctx.paths.folds_csv} exactly once; rerun with --restart")
        oof_view[v] = oof.loc[folds.sample_index].reset_index()
        tests = [read_test(out / f"fold_{k}" / "tta" / f"test_{v}.csv", classes=classes)
                 for k in range(n_folds)]
        ids = tests[0].index
        if any(not t.index.equals(ids) for t in tests):
            raise KitError(f"{out}: fold test predictions list different images; "
                           "rerun with --restart")
        test_view[v] = prob_frame(ids, np.mean([t[pcols].to_numpy() for t in tests], 0),
                                  classes=classes)
    oof_main = oof_view[views[0]][["sample_index", "fold", "label"]].copy()
    probs = np.mean([oof_view[v][pcols].to_numpy() for v in views], axis=0)
    oof_main[pcols] = probs
    test_main = prob_frame(test_view[views[0]].sample_index,
                           np.mean([test_view[v][pcols].to_numpy() for v in views], 0),
                           classes=classes)

    (out / "metrics.json").unlink(missing_ok=True)  # the commit mark of the assembled files
    tta_dir = out / "tta"
    for stale in tta_dir.glob("*.csv") if tta_dir.exists() else []:
        if stale.stem.split("_", 1)[-1] not in views:
            stale.unlink()
    for v in views:
        atomic_write_csv(tta_dir / f"oof_{v}.csv", oof_view[v], FLOAT_FORMAT)
        atomic_write_csv(tta_dir / f"test_{v}.csv", test_view[v], FLOAT_FORMAT)
    atomic_write_csv(out / "oof.csv", oof_main, FLOAT_FORMAT)
    attention = [out / f"fold_{k}" / "attention.csv" for k in range(n_folds)]
    if all(p.exists() for p in attention):
        atomic_write_csv(out / "attention.csv",
                         pd.concat([_read_table(p) for p in attention], ignore_index=True),
                         FLOAT_FORMAT)
    else:
        (out / "attention.csv").unlink(missing_ok=True)
    atomic_write_csv(out / "test.csv", test_main, FLOAT_FORMAT)

    issues_summary = _assemble_issues(ctx)
    y = to_indices(oof_main.label.to_numpy(), classes)
    summary = classification_summary(y, probs, classes)
    # Over images (1000 seeded resamples): how far another draw of images could move a score.
    ci = bootstrap_ci(y, probs, classes=classes)  # macro F1's, as metrics.json always had
    oof_score = score(metric, y, probs, classes)
    score_ci = ci if metric == "macro_f1" else bootstrap_ci(y, probs, metric=metric,
                                                             classes=classes)
    per_fold = []
    for k in range(n_folds):
        sel = oof_main.fold.to_numpy() == k
        m = marks[k]
        per_fold.append({"fold": k, "n": int(sel.sum()), "macro_f1": macro_f1(y[sel], probs[sel]),
                         "weighted_f1": weighted_f1(y[sel], probs[sel]),
                         "score": score(metric, y[sel], probs[sel], classes),
                         f"val_{metric}_id": m[f"val_{metric}"], "best_epoch": m["best_epoch"],
                         "epochs": m["epochs"], "seconds": m["seconds"],
                         "collapsed": collapse_reason(y[sel], probs[sel], classes=classes,
                                                      metric=metric)})
    cfg_record = {"backbone": ctx.backbone, "weights": ctx.fused.weights if ctx.fused
                  else str(ctx.weights), "seed": ctx.seed, "params": ctx.params_desc,
                  "training_path": ctx.training_path,
                  **({"fusion": ctx.fused.record()} if ctx.fused else {}), **ctx.cfg}
    metrics = {
        "backbone": ctx.backbone, "run": ctx.name or ctx.backbone, "metric": metric,
        "oof_score": oof_score,
        "oof_score_ci95": list(score_ci), "oof_macro_f1": summary["macro_f1"],
        "oof_macro_f1_ci95": list(ci),
        "oof_weighted_f1": summary["weighted_f1"], "oof_accuracy": summary["accuracy"],
        "per_fold": per_fold, "per_class": summary["per_class"],
        "confusion": summary["confusion"], "classes": list(classes),
        "per_view_macro_f1": {v: macro_f1(y, oof_view[v][pcols].to_numpy()) for v in views},
        "per_view_score": {v: score(metric, y, oof_view[v][pcols].to_numpy(), classes)
                           for v in views},
        "views": list(views), "aggregate": ctx.cfg["head"]["pool"],
        "n_oof": len(oof_main), "n_test": len(test_main),
        "folds_sha256": ctx.folds_sha, "patch_keys": ctx.keys,
        "config_hash": ctx.hash, "config": cfg_record,
        "weights_source": marks[0]["weights_source"],
        "trainable_params": marks[0]["trainable_params"],
        "seconds": round(sum(m["seconds"] for m in marks.values()), 1),
        "training_path": ctx.training_path,
        "selection": {**_selection(ctx.cfg, ctx.training_path),
                      "configured": str(ctx.cfg["early_stopping"])},
        # Folds whose model predicts (nearly) one class or does no better than the majority
        # class: flagged here, in the run output, the report and the blend.
        "collapsed_folds": [f["fold"] for f in per_fold if f["collapsed"]],
        "collapsed": collapse_reason(y, probs, classes=classes, metric=metric),
        # How the parameters were chosen (kit.training.cv.run_cv fills ctx.params_source).
        "params_source": ctx.params_source or {"description": ctx.params_desc},
        "bag": int(ctx.cfg["bag"]),
        "label_issues": issues_summary,
        "versions": package_versions(),
    }
    if ctx.training_path == "feature_cache":
        metrics["feature_cache"] = {**marks[0].get("feature_cache", {}),
                                    "not_applied": pixel_augment_not_applied(ctx.cfg)}
    plot_confusion(summary["confusion"], classes, out / "confusion.png",
                   title=f"{ctx.backbone} OOF, {get_metric(metric).title} {oof_score:.3f}")
    write_config(out / "config.yaml", cfg_record)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def _assemble_issues(ctx: CVRun) -> dict:
    """``runs/<bb>/label_issues.csv`` from the folds' files (one row per training image: its
    label, the suggested label, its quality and the folds that flagged it) and the summary
    for metrics.json; removes a stale file when label issues are off."""
    path = ctx.out / label_issues.FILE
    mode = ctx.cfg["label_issues"]["mode"]
    if mode == "off":
        path.unlink(missing_ok=True)
        return {"mode": "off"}
    frames = [_read_table(ctx.out / f"fold_{k}" / label_issues.FILE) for k in range(ctx.n_folds)]
    table = label_issues.summarise(frames, ctx.task.classes)
    atomic_write_csv(path, table, FLOAT_FORMAT)
    return {"mode": mode, "model": ctx.cfg["label_issues"]["model"],
            "inner_folds": int(ctx.cfg["label_issues"]["inner_folds"]),
            "n_images": int(len(table)), "n_flagged": int(table.flagged.sum()),
            "file": str(path)}


def _selection(cfg: dict, training_path: str = "pixels") -> dict:
    """How every fold chose its epoch, for metrics.json, the blend manifest and the report."""
    if cfg["head"]["type"] == "logreg":
        return {"early_stopping": "probe", "epochs_honest": True, "inner_folds":
                int(cfg["inner_folds"]), "description": "linear probe: C chosen on an inner "
                "split of each fold's training images, then refit on them all"}
    mode = early_stopping_mode(cfg, training_path)
    text = {"inner": "early stopping on an inner split of each fold's training images",
            "refit": "epoch count chosen on an inner split, then refit on all training images",
            "none": f"a fixed {cfg['epochs']} epochs",
            "oof": "early stopping on the fold's own OOF images (optimistic)"}[mode]
    out = {"early_stopping": mode, "epochs_honest": is_honest(mode), "description": text}
    if mode in ("inner", "refit"):
        out["inner_folds"] = int(cfg["inner_folds"])
    return out
