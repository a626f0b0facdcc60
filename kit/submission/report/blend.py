"""The report's blend section: weights, class biases, the nested (expected) against the
in-sample (optimistic) scores in the blend's metric, and where the blend's inputs' scores
came from."""
from __future__ import annotations

import pandas as pd

from kit.metrics import bootstrap_ci, get_metric, to_indices
from kit.paths import Paths
from kit.submission.report.layout import (
    READ_ERRORS,
    Todo,
    honesty_cell,
    interval,
    make_table,
    read_json,
    score_ci,
)
from kit.task import Task, task_of


def blend_record(paths: Paths) -> tuple[dict | None, str]:
    """The newest blend: ``runs/blend/blend.json``, else ``submissions/latest.json``."""
    blend_json = paths.runs_dir / "blend" / "blend.json"
    if blend_json.is_file():
        return read_json(blend_json), "runs/blend/blend.json"
    latest = paths.submissions_dir / "latest.json"
    if latest.is_file():
        manifest = read_json(latest)
        return ({**manifest["blend"], "scores": manifest["scores"],
                 **{k: manifest[k] for k in ("expected_score", "expected_ci95", "metric")
                    if k in manifest}},
                "submissions/latest.json")
    return None, ""


def blend_metric(record: dict) -> str:
    """The metric a blend record or manifest scores in (macro F1 in one from before tasks)."""
    return (record.get("metric") or (record.get("scores") or {}).get("metric")
            or (record.get("expected_score") or {}).get("metric") or "macro_f1")


def score(block: dict, key: str = "score"):
    """A score record's value in its metric: ``score`` (``score_no_bias``), else the
    ``macro_f1`` (``macro_f1_no_bias``) an older record holds."""
    if key in block:
        return block[key]
    return block.get(key.replace("score", "macro_f1", 1))


def blend_section(paths: Paths, task: Task | None = None) -> dict | Todo:
    """Weights, class biases and the nested (expected) vs in-sample (optimistic) scores in
    the blend's metric; per-class F1 for the task's classes."""
    task = task_of(None) if task is None else task
    blend, source = blend_record(paths)
    if blend is None:
        return Todo("no blend", "./run.sh blend")
    title = get_metric(blend_metric(blend)).title
    scores = blend.get("scores", {})
    nested, in_sample = scores.get("nested", {}), scores.get("in_sample", {})
    expected = blend.get("expected_score")
    why_optimistic = []
    if expected is None:
        nested_head, verdict = "nested (inputs not recorded: rerun ./run.sh blend)", "unrecorded"
    elif expected.get("honest"):
        nested_head, verdict = "nested (expected)", "honest"
    else:
        nested_head, verdict = "nested (optimistic)", "optimistic"
        why_optimistic = [(bb, "; ".join(why)) for bb, why in (expected.get("why") or {}).items()]
    score_rows = [
        ["blend + class biases", score(in_sample),
         score_ci(score(nested), blend_ci(paths, blend, source, task))],
        ["blend, plain argmax", score(in_sample, "score_no_bias"),
         score(nested, "score_no_bias")],
    ]
    base = scores.get("baselines", {})
    if "equal_weights" in base:
        score_rows.append(["equal weights (baseline)", score(base["equal_weights"]), None])
    if "best_single" in base:
        best = base["best_single"]
        score_rows.append([f"best single: {best.get('model')}", score(best), None])
    ctx = {"source": source, "n_backbones": len(blend.get("backbones", [])),
           "objective": blend.get("objective", "?"), "metric": title, "verdict": verdict,
           "why_optimistic": why_optimistic,
           "scores": make_table([f"OOF {title}", "in-sample (optimistic)",
                                 f"{nested_head} [95% interval]"], score_rows, "num"),
           "provenance": None, "per_fold": None, "per_class": None}
    prov = blend.get("inputs_provenance") or {}
    if prov:
        ctx["provenance"] = make_table(
            ["input", "training path", "epochs chosen by", "params", "OOF score", "why"],
            [[bb, p.get("training_path"), p.get("epochs"), p.get("params"),
              honesty_cell(bool(p.get("honest"))), "; ".join(p.get("why") or []) or None]
             for bb, p in prov.items()])
    per_fold = sorted((int(k), v) for k, v in (nested.get("per_fold") or {}).items())
    if per_fold:
        ctx["per_fold"] = make_table([f"nested {title} by fold",
                                      *[f"fold {k}" for k, _ in per_fold]],
                                     [["", *[v for _, v in per_fold]]], "num")
    pc_in, pc_nested = in_sample.get("per_class_f1", {}), nested.get("per_class_f1", {})
    if pc_in or pc_nested:
        ctx["per_class"] = make_table(["class", "F1 in-sample", "F1 nested"],
                                      [[c, pc_in.get(c), pc_nested.get(c)]
                                       for c in task.classes], "num")
    weights = sorted(blend.get("weights", {}).items(), key=lambda kv: -kv[1])
    biases = blend.get("biases", {})
    order = [c for c in task.classes if c in biases] + sorted(set(biases) - set(task.classes))
    return {**ctx,
            "weights": make_table(["model", "weight"], [[m, w] for m, w in weights], "num"),
            "biases": make_table(["class", "bias on log p"], [[c, biases[c]] for c in order],
                                 "num")}


def recorded_ci(record: dict) -> list[float] | None:
    """The interval a blend record or manifest stores beside its nested (expected) score."""
    expected = record.get("expected_score") or {}
    nested = (record.get("scores") or {}).get("nested") or {}
    for ci in (expected.get("ci95"), expected.get("macro_f1_ci95"), record.get("expected_ci95"),
               nested.get("ci95"), nested.get("macro_f1_ci95")):
        if interval(ci) is not None:
            return interval(ci)
    return None


def blend_ci(paths: Paths, blend: dict, source: str,
             task: Task | None = None) -> list[float] | None:
    """The blend's expected-score interval: as recorded, else bootstrapped (in the blend's
    metric) from the nested predictions of ``runs/blend/oof_blend.csv`` when they give the
    recorded nested score (the same blend); None otherwise."""
    task = task_of(None) if task is None else task
    recorded = recorded_ci(blend)
    if recorded is not None or source != "runs/blend/blend.json":
        return recorded
    nested = score((blend.get("scores") or {}).get("nested") or {})
    metric = get_metric(blend_metric(blend))
    try:
        oof = pd.read_csv(paths.runs_dir / "blend" / "oof_blend.csv", dtype=str,
                          keep_default_na=False)
        y = to_indices(oof["label"].to_numpy(), task.classes)
        pred = to_indices(oof["pred_nested"].to_numpy(), task.classes)
        got = metric(y, pred, task.classes)
    except READ_ERRORS:  # an older blend without pred_nested: no interval, not an error
        return None
    if nested is None or abs(got - float(nested)) > 1e-6:
        return None  # oof_blend.csv is not the recorded blend's: its interval would mislead
    return interval(bootstrap_ci(y, pred, metric=metric.name, classes=task.classes))
