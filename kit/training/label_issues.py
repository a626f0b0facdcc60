"""Suspected label errors among one fold's training images, found on those images alone.

For outer fold ``k``, an inner cross-validation over fold ``k``'s *training* images gives
each of them an out-of-fold probability; cleanlab's confident learning
(``cleanlab.filter.find_label_issues``) flags the images whose given label disagrees with
it, and ``cleanlab.rank.get_label_quality_scores`` scores every label. Fold ``k``'s own
images (its OOF rows) take no part: their labels never decide what fold ``k``'s model
drops, and they are still predicted and scored, all of them. ``label_issues.mode: drop``
trains without the flagged images; ``weight`` draws each image in proportion to its label
quality (floored at ``min_weight``).

The inner models are heads on cached embeddings (:class:`kit.training.sources.FeatureSource`),
on the pixel path too (the same backbone, frozen), so the search stays cheap.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kit.models.heads import create_head
from kit.task import default_task
from kit.training.selection import grouped_splits
from kit.training.train import fit
from kit.utils import seed_everything

FILE = "label_issues.csv"
COLUMNS = ("sample_index", "label", "suggested_label", "quality", "flagged", "n_folds",
           "flagged_by")


@dataclass
class FoldIssues:
    """What the inner cross-validation of one outer fold found about its training images."""

    fold: int
    sample_index: np.ndarray  # the fold's training images, in the order given
    y: np.ndarray  # given class indices
    probs: np.ndarray  # inner out-of-fold probabilities, n x C
    flagged: np.ndarray  # bool, suspected label errors
    quality: np.ndarray  # label quality in [0, 1] (cleanlab, self-confidence)
    # the task's, in the order of y and probs (default: the built-in task's)
    classes: tuple[str, ...] = field(default_factory=lambda: default_task().classes)

    def frame(self) -> pd.DataFrame:
        """One row per training image: ``fold_k/label_issues.csv``."""
        df = pd.DataFrame({"sample_index": self.sample_index, "fold": self.fold,
                           "label": [self.classes[i] for i in self.y],
                           "quality": self.quality, "flagged": self.flagged.astype(int)})
        for j, c in enumerate(self.classes):
            df[f"p_{c}"] = self.probs[:, j]
        return df


def inner_config(cfg: dict) -> dict:
    """The config of the inner models: the run's, without label issues or bagging, and the
    linear probe when ``label_issues.model`` is ``logreg``."""
    inner = copy.deepcopy(cfg)
    inner["label_issues"]["mode"] = "off"
    inner["bag"] = 1
    if cfg["label_issues"]["model"] == "logreg":
        inner["head"].update(type="logreg", pool="mean_logprob")
    return inner


def inner_oof_probs(source, rows, y, groups, cfg: dict, seed: int, desc: str = "",
                    task=None) -> np.ndarray:
    """Out-of-fold image probabilities (``id`` view) of ``rows`` from an inner
    cross-validation on ``rows`` alone (``label_issues.inner_folds`` folds, drawn from
    ``seed``, each of ``groups`` on one side); the models are ``cfg``'s head (or the probe) on
    ``source``'s embeddings, one output per class of ``task`` (default: the built-in task),
    their epochs chosen by its metric."""
    task = default_task() if task is None else task
    rows, y = np.asarray(rows, np.int64), np.asarray(y, np.int64)
    icfg = inner_config(cfg)
    n_classes = len(task.classes)
    probs = np.zeros((len(rows), n_classes))
    splits = grouped_splits(y, groups, int(cfg["label_issues"]["inner_folds"]), seed,
                            too_few="label_issues: {n} training images are too few for an "
                                    "inner cross-validation; set label_issues.mode=off")
    for j, (a, b) in enumerate(splits):
        s = int(seed) + 101 * (j + 1)
        seed_everything(s)
        head = create_head(source.x.shape[-1], n_classes, **icfg["head"])
        res = fit(head, source, rows[a], y[a], icfg, seed=s, device=source.device,
                  groups=None if groups is None else np.asarray(groups)[a],
                  desc=f"{desc}label issues {j + 1}/{len(splits)}", metric=task.metric)
        probs[b] = source.image_probs(res.model, rows[b], ("id",))["id"]
    return probs


def confident_learning(y, probs) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's flags (``find_label_issues``, pruned by noise rate) and label quality
    scores (self-confidence) for labels ``y`` given out-of-fold ``probs``.

    Only the classes present in ``y`` are passed (cleanlab needs every class it is given to
    occur); the probabilities are renormalised over them.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    y = np.asarray(y, np.int64)
    present = np.unique(y)
    if len(present) < 2:
        return np.zeros(len(y), bool), np.ones(len(y))
    p = np.clip(np.asarray(probs, np.float64)[:, present], 1e-12, None)
    p /= p.sum(1, keepdims=True)
    labels = np.searchsorted(present, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flagged = find_label_issues(labels, p, n_jobs=1)
        quality = get_label_quality_scores(labels, p)
    return np.asarray(flagged, bool), np.asarray(quality, np.float64)


def find_fold_issues(source, frame: pd.DataFrame, cfg: dict, seed: int, fold: int,
                     desc: str = "", task=None) -> FoldIssues:
    """:class:`FoldIssues` of outer fold ``fold``'s training images ``frame`` (folds-file rows
    with ``row``, ``y`` and optionally ``group``, which the inner folds keep whole), from their
    labels alone; ``task`` (default: the built-in one) gives the classes and the metric."""
    task = default_task() if task is None else task
    groups = frame.group.values if "group" in frame.columns else None
    probs = inner_oof_probs(source, frame.row.values, frame.y.values, groups, cfg, seed, desc,
                            task)
    flagged, quality = confident_learning(frame.y.values, probs)
    return FoldIssues(int(fold), frame.sample_index.values, frame.y.values.astype(np.int64),
                      probs, flagged, quality, tuple(task.classes))


def training_weights(issues: FoldIssues | None, cfg: dict):
    """``(keep, weight)`` for a fold's training images: which to train on (``drop`` removes
    the flagged) and the sampling weight of those kept (``weight`` mode), or None."""
    mode = cfg["label_issues"]["mode"]
    n = 0 if issues is None else len(issues.y)
    if issues is None or mode == "off":
        return None, None
    if mode == "drop":
        keep = ~issues.flagged
        kept = issues.y[keep]
        missing = sorted(set(issues.y.tolist()) - set(kept.tolist()))
        if missing:  # never drop a class out of training altogether
            keep = keep | np.isin(issues.y, missing)
        return keep, None
    floor = float(cfg["label_issues"]["min_weight"])
    return np.ones(n, bool), np.maximum(issues.quality, floor)


def summarise(frames: list[pd.DataFrame], classes=None) -> pd.DataFrame:
    """Per image over the folds that assessed it: ``label_issues.csv`` (``classes``: the
    task's, default the built-in task's).

    ``suggested_label`` is the argmax of the mean inner probability, ``quality`` the mean
    label quality, ``flagged`` whether any fold flagged it, ``flagged_by`` those folds
    (``;``-separated); sorted by quality, the most confident suspects first.
    """
    if not frames:
        return pd.DataFrame(columns=list(COLUMNS))
    classes = default_task().classes if classes is None else tuple(classes)
    df = pd.concat(frames, ignore_index=True)
    pcols = [f"p_{c}" for c in classes]
    rows = []
    for sid, g in df.groupby("sample_index", sort=False):
        mean = g[pcols].to_numpy().mean(0)
        folds = sorted(int(f) for f in g.fold[g.flagged.astype(bool)])
        rows.append({"sample_index": sid, "label": g.label.iloc[0],
                     "suggested_label": classes[int(mean.argmax())],
                     "quality": float(g.quality.mean()), "flagged": int(bool(folds)),
                     "n_folds": int(len(g)), "flagged_by": ";".join(map(str, folds)),
                     **{c: float(v) for c, v in zip(pcols, mean)}})
    out = pd.DataFrame(rows)
    return out.sort_values(["quality", "sample_index"], kind="mergesort").reset_index(drop=True)
