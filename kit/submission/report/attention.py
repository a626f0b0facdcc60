"""The report's attention section: for backbones with an attention head, a few OOF images'
patches, each captioned with its attention weight."""
from __future__ import annotations

import numpy as np
import pandas as pd

from kit.data.patches import find_patches, load_patches
from kit.paths import Paths
from kit.submission.report.cv import backbone_metrics
from kit.submission.report.layout import figure_png, inline_image, pyplot
from kit.utils import KitError


def attention_section(paths: Paths, cfg: dict) -> dict:
    """For backbones with an attention head: a few OOF images' patches, each captioned with
    its attention weight (highest first)."""
    metrics = backbone_metrics(paths)
    found = {name: d / "attention.csv" for name in metrics
             if (d := paths.backbone_dir(name)) and (d / "attention.csv").is_file()}
    if not found:
        return {"runs": None, "no_patches": None}
    runs = []
    for name, path in found.items():
        # the cache the run trained on (its key), else the only one there is
        key = (metrics[name].get("patch_keys") or {}).get("train")
        try:
            patches = (key and find_patches(paths, "train", key)) or load_patches(paths, "train")
        except KitError as exc:
            return {"runs": [], "no_patches": str(exc)}
        rows = {s: i for i, s in enumerate(patches.samples.sample_index)}
        att = pd.read_csv(path, dtype={"sample_index": str})
        peak = att.groupby("sample_index").weight.max().sort_values(ascending=False, kind="stable")
        shown = [s for s in peak.index if s in rows][:int(cfg["attention_images"])]
        strips = [inline_image(attention_png(patches.array[rows[s]],
                                             att[att.sample_index == s].sort_values("patch")
                                             .weight.to_numpy(), s), alt=s)
                          for s in shown]
        runs.append({"name": name, "strips": strips, "n_images": att.sample_index.nunique(),
                     "uniform": 1 / max(1, att.groupby("sample_index").size().max())})
    return {"runs": runs, "no_patches": None}


def attention_png(patches: np.ndarray, weights: np.ndarray, title: str) -> bytes:
    """One image's K patches in a row, highest attention first, each titled with its weight."""
    plt = pyplot()
    order = np.argsort(-weights, kind="stable")
    k = len(order)
    fig, axes = plt.subplots(1, k, figsize=(1.1 * k, 1.5), squeeze=False)
    for ax, j in zip(axes[0], order):
        ax.imshow(patches[j])
        ax.set_title(f"{weights[j]:.2f}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    return figure_png(fig)
