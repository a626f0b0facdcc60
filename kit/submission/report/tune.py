"""The report's tuning section: per tuned backbone, the search score (best of N, optimistic),
the winner on the folds the search did not use, and the nested estimate."""
from __future__ import annotations

from kit.paths import Paths
from kit.submission.report.layout import Todo, make_table, read_json, score_ci
from kit.utils import read_yaml


def tune_records(paths: Paths) -> dict[str, dict]:
    """``{backbone: {"best": best.yaml or None, "estimate": estimate.json or None}}``."""
    root = paths.runs_dir / "tune"
    if not root.is_dir():
        return {}
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        best, est = d / "best.yaml", d / "estimate.json"
        if best.is_file() or est.is_file():
            out[d.name] = {"best": read_yaml(best) if best.is_file() else None,
                           "estimate": read_json(est) if est.is_file() else None}
    return out


def tune_section(paths: Paths) -> dict | Todo:
    """Per tuned backbone: the search score (best of N, optimistic), the winner on the folds
    the search did not use, and the nested estimate of the tuned pipeline."""
    found = tune_records(paths)
    if not found:
        return Todo("no tuning", "./run.sh tune <backbone>")
    rows, outer = [], []
    for name, r in found.items():
        b, e = r["best"] or {}, r["estimate"] or {}
        rows.append([name, b.get("objective", "features (assumed: not recorded)" if b else None),
                     b.get("training_path"), b.get("early_stopping"), b.get("trials"),
                     b.get("search_score"), b.get("search_score_kind"),
                     b.get("holdout_score"),
                     score_ci(e.get("macro_f1"), e.get("estimate_ci95")),
                     (f"{e.get('trials_per_outer_fold')} trials per outer fold"
                      + ("" if e.get("honest", True) else "; " + str(e.get("why"))))
                     if e else None])
        if e.get("outer"):
            outer.append([name, *[o.get("macro_f1") for o in e["outer"]]])
    table = make_table(["backbone", "objective", "training path", "early stopping", "trials",
                        "search score", "what it is", "holdout score",
                        "nested estimate [95% interval]", "estimate settings"], rows)
    if not outer:
        return {"runs": table, "outer": None}
    width = max(len(r) for r in outer) - 1
    return {"runs": table, "outer": make_table(["nested estimate by outer fold",
                                                *[f"fold {k}" for k in range(width)]],
                                               outer, "num")}
