"""The report's calibration section: a top-label reliability diagram of the blended OOF
probabilities, with their expected calibration error (ECE)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from kit.paths import Paths
from kit.submission.report.blend import blend_record
from kit.submission.report.layout import Todo, figure_png, inline_image, pyplot
from kit.task import Task, task_of
from kit.utils import KitError


def blended_oof(paths: Paths, task: Task | None = None) -> tuple[pd.DataFrame | None, str]:
    """Blended OOF probabilities: ``runs/blend/oof_blend.csv``, else recomputed.

    The fallback weights each library model's ``oof.csv`` (``bb/view`` models read
    ``runs/bb/tta/oof_view.csv``) by the newest blend's weights; ``task`` names the
    probability columns (default: the built-in task's).
    """
    columns = (task_of(None) if task is None else task).prob_columns
    path = paths.runs_dir / "blend" / "oof_blend.csv"
    if path.is_file():
        return pd.read_csv(path), "runs/blend/oof_blend.csv"
    blend, source = blend_record(paths)
    if blend is None or not blend.get("weights"):
        return None, ""
    total, frame = None, None
    for model, weight in blend["weights"].items():
        if not weight:
            continue
        bb, _, view = model.partition("/")
        file = (paths.backbone_dir(bb) / "tta" / f"oof_{view}.csv" if view
                else paths.backbone_dir(bb) / "oof.csv")
        df = pd.read_csv(file).sort_values("sample_index").reset_index(drop=True)
        probs = weight * df[columns].to_numpy(np.float64)
        if total is None:
            total, frame = probs, df[["sample_index", "label"]].copy()
        elif not df["sample_index"].equals(frame["sample_index"]):
            raise KitError(f"{file}: covers other images than the blend's other models; "
                           "rerun ./run.sh blend")
        else:
            total = total + probs
    if total is None:
        return None, ""
    frame[columns] = total / total.sum(axis=1, keepdims=True)
    return frame, f"backbone oof.csv files weighted as in {source}"


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> dict:
    """Top-label reliability: per confidence bin, mean confidence, accuracy and count; ECE."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, conf, bins) / count
        acc = np.bincount(idx, correct, bins) / count
    ece = float(np.nansum(count * np.abs(acc - mean_conf)) / max(len(y), 1))
    return {"edges": edges, "confidence": mean_conf, "accuracy": acc, "count": count, "ece": ece}


def reliability_section(paths: Paths, cfg: dict, task: Task | None = None) -> dict | Todo:
    """Top-label reliability diagram of the blended OOF probabilities, with their ECE."""
    task = task_of(None) if task is None else task
    oof, source = blended_oof(paths, task)
    if oof is None:
        return Todo("no blended OOF probabilities", "./run.sh blend")
    lookup = {c: i for i, c in enumerate(task.classes)}
    y = oof["label"].astype(str).map(lookup).to_numpy()
    nested = [f"nested_{c}" for c in task.prob_columns]
    curves = {"in-sample weights": oof[task.prob_columns].to_numpy(np.float64)}
    if all(c in oof.columns for c in nested):
        curves["nested weights"] = oof[nested].to_numpy(np.float64)
    stats = {name: reliability(p, y, int(cfg["reliability_bins"])) for name, p in curves.items()}
    png = reliability_png(stats)
    return {"source": source, "n": len(oof),
            "eces": ", ".join(f"{n} {s['ece']:.3f}" for n, s in stats.items()),
            "plot": inline_image(png, alt="reliability diagram")}


def reliability_png(stats: dict) -> bytes:
    plt = pyplot()
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(6, 6.4), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="#888", lw=1, label="perfect calibration")
    for (name, s), marker in zip(stats.items(), "os^"):
        ok = s["count"] > 0
        ax.plot(s["confidence"][ok], s["accuracy"][ok], marker=marker,
                label=f"{name} (ECE {s['ece']:.3f})")
    ax.set_ylabel("accuracy of the top class")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize=9)
    ax.set_title("Blended OOF probabilities: reliability")
    first = next(iter(stats.values()))
    width = np.diff(first["edges"])
    hx.bar(first["edges"][:-1], first["count"], width=width, align="edge", color="#9bc",
           edgecolor="white")
    hx.set_xlabel("confidence (top-class probability)")
    hx.set_ylabel("images")
    fig.tight_layout()
    return figure_png(fig)
