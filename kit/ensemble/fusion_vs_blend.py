"""Fusion versus blend: a fused run's (``cv a+b``) OOF score (the task's metric) against the
blend of its parts' separate runs, paired on the same images. OOF only; nothing is chosen on
it."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kit.artifacts import read_metrics, read_oof
from kit.ensemble.blend import RESERVED_RUN_DIRS, provenance
from kit.metrics import bootstrap_ci, get_metric, paired_bootstrap, to_indices
from kit.paths import Paths
from kit.task import Task, task_of
from kit.utils import KitError

SEP = "+"  # as kit.training.fusion names a fused run
BLEND_SOURCE = "runs/blend/oof_blend.csv (nested: weights and biases fitted on the other folds)"
MEAN_SOURCE = ("mean of the parts' OOF probabilities (nothing fitted; no blend of exactly these "
               "parts)")


@dataclass
class Comparison:
    """One fused run against the blend of its parts (``diff`` = fused - blend), scores in
    the task's metric (``*_f1``: the names from when that was macro F1)."""

    fused: str
    parts: list[str]
    fused_f1: float
    fused_ci: list[float]
    blend_f1: float
    blend_ci: list[float]
    blend_source: str
    diff: float
    diff_ci: list[float]
    p_fused_better: float
    n: int
    optimistic: list[str]  # runs whose OOF rows chose their epochs or params (provenance)


def fused_runs(paths: Paths, task: Task | None = None) -> dict[str, list[str]]:
    """Fused runs under ``runs/`` with a ``metrics.json``: name -> parts (as recorded)."""
    task = task_of(None) if task is None else task
    if not paths.runs_dir.is_dir():
        return {}
    out = {}
    for d in sorted(paths.runs_dir.iterdir()):
        if SEP in d.name and d.name not in RESERVED_RUN_DIRS and (d / "metrics.json").is_file():
            metrics = read_metrics(d / "metrics.json", classes=task.classes)
            record = (metrics.get("config") or {}).get("fusion") or {}
            out[d.name] = list(record.get("parts") or d.name.split(SEP))
    return out


def compare_all(paths: Paths, task: Task | None = None) -> tuple[list[Comparison], list[str]]:
    """Every fused run whose parts were cross-validated too, compared with their blend in
    ``task``'s metric (default: the built-in task's); and a note for each fused run that
    cannot be (which ``cv`` to run)."""
    task = task_of(None) if task is None else task
    done, notes = [], []
    for name, parts in fused_runs(paths, task).items():
        missing = [p for p in parts if not (paths.backbone_dir(p) / "metrics.json").is_file()]
        if missing:
            notes.append(f"{name}: no separate run of {', '.join(missing)} to blend "
                         f"(./run.sh cv {missing[0]})")
            continue
        try:
            done.append(compare(paths, name, parts, task))
        except KitError as exc:  # one run's problem leaves the others' rows (and cv) shown
            notes.append(str(exc))
    return done, notes


def compare(paths: Paths, fused: str, parts: list[str], task: Task | None = None) -> Comparison:
    """The fused run's OOF predictions against the blend of ``parts``: ``runs/blend/``'s
    nested predictions when that blend is of exactly these parts on the same folds file,
    else the mean of the parts' OOF probabilities; scored in ``task``'s metric."""
    task = task_of(None) if task is None else task
    metrics = {n: read_metrics(paths.backbone_dir(n) / "metrics.json", classes=task.classes,
                               metric=task.metric) for n in [fused, *parts]}
    sha = metrics[fused].get("folds_sha256")
    other = [p for p in parts if metrics[p].get("folds_sha256") != sha]
    if other:
        raise KitError(f"{fused}: {', '.join(other)} trained on another folds file; rerun "
                       f"./run.sh cv {other[0]} to compare")
    cols = task.prob_columns
    oof = read_oof(paths.backbone_dir(fused) / "oof.csv", classes=task.classes)
    y = to_indices(oof.label.to_numpy(), task.classes)
    pred_fused = oof[cols].to_numpy(np.float64).argmax(1)
    pred_blend, source = _blend_pred(paths, parts, sha, oof.index, task)
    if pred_blend is None:
        probs = [read_oof(paths.backbone_dir(p) / "oof.csv", classes=task.classes)
                 for p in parts]
        for p, frame in zip(parts, probs):
            if set(frame.index) != set(oof.index):
                raise KitError(f"{paths.backbone_dir(p) / 'oof.csv'}: not the images of "
                               f"{fused}'s oof.csv; rerun ./run.sh cv {p}")
        pred_blend = np.mean([f.loc[oof.index, cols].to_numpy(np.float64)
                              for f in probs], axis=0).argmax(1)
        source = MEAN_SOURCE
    metric = {"metric": task.metric, "classes": task.classes}
    pair = paired_bootstrap(y, pred_blend, pred_fused, **metric)
    score = get_metric(task.metric).batch
    c = len(task.classes)
    return Comparison(fused, list(parts), float(score(pred_fused[None], y, c)[0]),
                      list(bootstrap_ci(y, pred_fused, **metric)),
                      float(score(pred_blend[None], y, c)[0]),
                      list(bootstrap_ci(y, pred_blend, **metric)), source, pair["diff"],
                      pair["ci95"],
                      pair["p_b_better"], pair["n"],
                      [n for n, m in metrics.items() if not provenance(m)["honest"]])


def _blend_pred(paths: Paths, parts: list[str], sha, index,
                task: Task) -> tuple[np.ndarray | None, str]:
    """The nested blend predictions of ``runs/blend/`` when it blends exactly ``parts``."""
    folder = paths.runs_dir / "blend"
    if not (folder / "blend.json").is_file() or not (folder / "oof_blend.csv").is_file():
        return None, ""
    try:
        record = json.loads((folder / "blend.json").read_text())
    except (OSError, ValueError) as exc:
        raise KitError(f"{folder / 'blend.json'}: cannot be read ({exc}); rerun "
                       "./run.sh blend") from exc
    record = record if isinstance(record, dict) else {}
    if sorted(record.get("backbones") or []) != sorted(parts) or record.get("folds_sha256") != sha:
        return None, ""
    oof = pd.read_csv(folder / "oof_blend.csv", dtype={"sample_index": str, "label": str,
                                                       "pred_nested": str},
                      keep_default_na=False).set_index("sample_index")
    if "pred_nested" not in oof.columns or set(oof.index) != set(index):
        return None, ""
    return to_indices(oof.loc[index, "pred_nested"].to_numpy(), task.classes), BLEND_SOURCE
