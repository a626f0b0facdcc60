"""The report's cross-validation section: per-backbone OOF scores in the task's metric with
their intervals, per fold and per class, confusion matrices, how each score was chosen, fused
runs against blends."""
from __future__ import annotations

import numpy as np
import pandas as pd

from kit.artifacts import run_metric, run_score
from kit.ensemble.blend import RESERVED_RUN_DIRS, collapse_note, provenance
from kit.ensemble.fusion_vs_blend import compare_all
from kit.metrics import bootstrap_ci, confusion_figure, get_metric, to_indices
from kit.paths import Paths
from kit.submission.report.layout import (
    READ_ERRORS,
    Bold,
    Todo,
    figure_png,
    honesty_cell,
    inline_image,
    interval,
    make_table,
    read_json,
    score_ci,
)
from kit.task import Task, task_of


def backbone_metrics(paths: Paths) -> dict[str, dict]:
    """``runs/<bb>/metrics.json`` of every backbone that has one, by name."""
    if not paths.runs_dir.is_dir():
        return {}
    return {d.name: read_json(d / "metrics.json") for d in sorted(paths.runs_dir.iterdir())
           if d.is_dir() and d.name not in RESERVED_RUN_DIRS and (d / "metrics.json").is_file()}


def headline(title: str) -> str:
    """A metric's title as a heading starts it (``macro F1`` -> ``Macro F1``)."""
    return title[:1].upper() + title[1:]


def cv_section(paths: Paths, task: Task | None = None) -> dict | Todo:
    """Per-backbone OOF scores in the task's metric (overall, per fold), per-class F1 and
    confusion matrices."""
    task = task_of(None) if task is None else task
    metrics = backbone_metrics(paths)
    if not metrics:
        return Todo("no backbone cross-validated", "./run.sh cv <backbone>")
    title = get_metric(task.metric).title
    n_folds = max(len(m.get("per_fold", [])) for m in metrics.values())
    cis = {name: oof_ci(paths, name, m, task) for name, m in metrics.items()}
    rows = []
    for name, m in metrics.items():
        folds = {int(f["fold"]): _fold_score(f, m, task) for f in m.get("per_fold", [])}
        rows.append([name, score_ci(_score(m, task), cis[name]), m.get("oof_weighted_f1"),
                    *[folds.get(k) for k in range(n_folds)],
                    _sources(m.get("weights_source")), m.get("n_oof")])
    scores = make_table(["backbone", f"OOF {title} [95% interval]", "OOF weighted F1",
                         *[f"fold {k}" for k in range(n_folds)], "weights", "OOF images"],
                        rows, "num")
    class_rows = []
    for name, m in metrics.items():
        per_class = m.get("per_class", {})
        class_rows.append([name, *[per_class.get(c, {}).get("f1") for c in task.classes]])
    fusion, fusion_notes = fusion_table(paths, task)
    return {"scores": scores, "headline": headline(title), "collapsed": collapse_notes(metrics),
            "fusion": fusion, "fusion_notes": fusion_notes,
            "provenance": provenance_table(metrics),
            "per_class": make_table(["backbone", *[f"F1 {c}" for c in task.classes]],
                                    class_rows, "num"),
            "figures": [_confusion_figure(paths, name, m, cis[name], task)
                        for name, m in metrics.items()]}


def _score(m: dict, task: Task):
    """A run's OOF score in the task's metric (:func:`kit.artifacts.run_score`); None when
    it records another metric's."""
    metric, score, _ = run_score(m)
    return score if metric == task.metric else None


def _fold_score(f: dict, m: dict, task: Task):
    """One fold's score in the task's metric: its ``score``, or for macro F1 its
    ``macro_f1`` (all an older cv records); None for a run scored by another metric."""
    if run_metric(m) != task.metric:
        return None
    return f["score"] if "score" in f else f.get("macro_f1") if task.metric == "macro_f1" \
        else None


def _sources(value):
    """A run's weights source; a fused run's, one ``part: source`` per backbone."""
    if isinstance(value, dict):
        return "; ".join(f"{k}: {v}" for k, v in value.items())
    return value


def fusion_table(paths: Paths, task: Task | None = None) -> tuple[dict | None, list[str]]:
    """Each fused run (``cv a+b``) against the blend of its parts' separate runs, paired on
    the same OOF images (:mod:`kit.ensemble.fusion_vs_blend`), and notes on those it cannot
    compare."""
    task = task_of(None) if task is None else task
    found, notes = compare_all(paths, task)
    if not found:
        return None, notes
    title = get_metric(task.metric).title
    rows = [[c.fused, score_ci(c.fused_f1, c.fused_ci), score_ci(c.blend_f1, c.blend_ci),
           c.blend_source, score_ci(c.diff, c.diff_ci), c.p_fused_better, c.n,
           Bold(", ".join(c.optimistic), "warn") if c.optimistic else "none"] for c in found]
    return make_table(["fused run", f"fused OOF {title} [95%]", "blend of the parts [95%]",
                       "blend from", "fused - blend [95%, paired]", "P(fused > blend)",
                       "images", "optimistic inputs"], rows, "num"), notes


def oof_ci(paths: Paths, name: str, m: dict, task: Task | None = None) -> list[float] | None:
    """A backbone's OOF score interval in the task's metric: the one its metrics.json
    records (``oof_score_ci95``, or ``oof_macro_f1_ci95`` from an older cv), else
    bootstrapped from its ``oof.csv``; None when neither can be read."""
    task = task_of(None) if task is None else task
    metric, _, recorded = run_score(m)
    if metric == task.metric and interval(recorded) is not None:
        return interval(recorded)
    try:
        oof = pd.read_csv(paths.backbone_dir(name) / "oof.csv",
                          dtype={"sample_index": str, "label": str})
        ci = bootstrap_ci(to_indices(oof["label"].to_numpy(), task.classes),
                          oof[task.prob_columns].to_numpy(np.float64), metric=task.metric,
                          classes=task.classes)
    except READ_ERRORS:  # no or a damaged oof.csv: the score is shown without an interval
        return None
    return interval(ci) if ci[0] == ci[0] else None


def collapse_notes(metrics: dict[str, dict]) -> list[tuple[str, str]]:
    """The collapse guard's flags, ``(backbone, note)``: backbones whose fold models predict
    (nearly) one class or do no better than the majority class."""
    return [(name, note) for name, m in metrics.items() if (note := collapse_note(m))]


def provenance_table(metrics: dict[str, dict]) -> dict:
    """Per backbone: training path, how the epochs and the params were chosen, and whether
    its OOF score is honest (nothing chosen on the OOF rows) or optimistic, and why."""
    rows = []
    for name, m in metrics.items():
        p = provenance(m)
        rows.append([name, m.get("training_path") or "unknown", p["epochs"], p["params"],
                     honesty_cell(p["honest"]), "; ".join(p["why"]) or None])
    return make_table(["backbone", "training path", "epochs chosen by", "params", "OOF score",
                       "why"], rows)


def _confusion_figure(paths: Paths, name: str, m: dict, ci, task: Task) -> dict:
    """``runs/<bb>/confusion.png``, else drawn from metrics.json; no image when neither."""
    png = paths.backbone_dir(name) / "confusion.png"
    if png.is_file():
        data = png.read_bytes()
    elif m.get("confusion"):
        data = confusion_png(m["confusion"], m.get("classes", task.classes),
                             f"{name} OOF, {get_metric(task.metric).title} "
                             f"{score_ci(_score(m, task), ci) or '–'}")
    else:
        return {"name": name, "img": None}
    return {"name": name, "img": inline_image(data, alt=f"{name} confusion matrix")}


def confusion_png(cm, classes, title: str) -> bytes:
    """PNG bytes of a confusion matrix, drawn as ``runs/<bb>/confusion.png`` is."""
    return figure_png(confusion_figure(cm, classes, title))
