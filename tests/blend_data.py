"""Inputs of the blend stage, written straight in the formats of docs/DESIGN.md.

``make_blend_workdir`` writes a dataset stub (``train_labels.csv``, ``test_data/``),
``folds/folds.csv``, ``folds/outliers.csv`` and ``runs/<bb>/{oof,test}.csv``, ``tta/`` and
``metrics.json`` for a few synthetic backbones (from ``kit.bench.blend.synthetic_problem``),
so that blend, package and reproduce tests do not depend on training.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from kit import CLASSES, PROB_COLUMNS
from kit.bench.blend import synthetic_problem
from kit.paths import Paths
from kit.utils import sha256_file

VIEWS = ("hflip", "orig")


def make_blend_workdir(root, n_train: int = 150, n_test: int = 40,
                       backbones=("bb_a", "bb_b", "bb_c"), n_folds: int = 5, seed: int = 0,
                       minority_scale: float = 0.35, test_prior=None):
    """Write a complete blend input tree under ``root``; return ``(Paths, data_root)``.

    ``test_prior``: the test images' class mix (default: the training mix)."""
    root = Path(root)
    paths = Paths.from_root(root / "work")
    data = root / "data"
    prob = synthetic_problem(n_train, len(backbones), n_folds, n_test, seed=seed,
                             minority_scale=minority_scale, test_prior=test_prior)
    ids = [f"img_{i:04d}.png" for i in range(n_train)]
    junk = [f"img_{i:04d}.png" for i in range(n_train, n_train + 2)]
    test_ids = [f"img_{i:04d}.png" for i in range(n_test)]
    labels = [CLASSES[i] for i in prob["y"]]

    (data / "test_data").mkdir(parents=True)
    pd.DataFrame({"sample_index": ids + junk, "label": labels + [CLASSES[0]] * 2}).to_csv(
        data / "train_labels.csv", index=False, lineterminator="\n")
    for name in test_ids:  # blend only lists test_data/, it never decodes the images
        (data / "test_data" / name).write_bytes(b"png")
        (data / "test_data" / name.replace("img_", "mask_")).write_bytes(b"png")

    paths.folds_dir.mkdir(parents=True)
    folds = pd.DataFrame({"sample_index": ids, "label": labels, "fold": prob["folds"]})
    folds.to_csv(paths.folds_csv, index=False, lineterminator="\n")
    outliers = pd.DataFrame({"sample_index": junk, "reason": ["cartoon", "green"],
                             "score": [0.9, 0.8]})
    outliers.to_csv(paths.outliers_csv, index=False, lineterminator="\n")
    rng = np.random.default_rng(seed + 1)
    for m, bb in enumerate(backbones):
        write_backbone(paths, bb, ids, prob["folds"], labels, prob["oof"][m], test_ids,
                       prob["test"][m], rng)
    return paths, data


def _views(p: np.ndarray, rng) -> list[np.ndarray]:
    out = []
    for _ in VIEWS:
        v = p * np.exp(rng.normal(0, 0.3, p.shape))
        out.append(v / v.sum(axis=1, keepdims=True))
    return out


def write_backbone(paths: Paths, bb: str, ids, folds, labels, oof, test_ids, test, rng) -> None:
    """``runs/<bb>/`` as the cv stage writes it: the TTA mean in the main files, views in tta/."""
    out = paths.backbone_dir(bb)
    (out / "tta").mkdir(parents=True)
    oof_views, test_views = _views(oof, rng), _views(test, rng)
    for view, o, t in zip(VIEWS, oof_views, test_views):
        _frame(ids, o, folds, labels).to_csv(out / "tta" / f"oof_{view}.csv", index=False,
                                             float_format="%.6f", lineterminator="\n")
        _frame(test_ids, t).to_csv(out / "tta" / f"test_{view}.csv", index=False,
                                   float_format="%.6f", lineterminator="\n")
    oof_mean, test_mean = np.mean(oof_views, axis=0), np.mean(test_views, axis=0)
    _frame(ids, oof_mean, folds, labels).to_csv(out / "oof.csv", index=False,
                                                float_format="%.6f", lineterminator="\n")
    _frame(test_ids, test_mean).to_csv(out / "test.csv", index=False, float_format="%.6f",
                                       lineterminator="\n")
    y = np.array([CLASSES.index(v) for v in labels])
    from kit.metrics import macro_f1

    metrics = {"folds_sha256": sha256_file(paths.folds_csv),
               "oof_macro_f1": macro_f1(y, oof_mean.argmax(axis=1)),
               "oof_weighted_f1": 0.0, "per_fold": {}, "per_class": {}, "confusion": [],
               "config": {"backbone": bb, "lr": 1e-3}, "weights_source": f"random ({bb})",
               "versions": {}}
    (out / "metrics.json").write_text(json.dumps(metrics))


def _frame(ids, probs, folds=None, labels=None, columns=PROB_COLUMNS) -> pd.DataFrame:
    df = pd.DataFrame({"sample_index": ids})
    if folds is not None:
        df["fold"] = folds
        df["label"] = labels
    df[list(columns)] = probs
    return df


def make_task_blend_workdir(root, layout: str = "csv", n_train: int = 60, n_test: int = 12,
                            backbones=("bb_a", "bb_b"), n_folds: int = 3, seed: int = 0,
                            minority_scale: float = 0.3):
    """A blend input tree for another competition than AN2DL: a dataset written by
    ``kit.data.task_synth`` in ``layout`` (three classes Normal/Benign/Invasive, metric
    balanced_accuracy, its ``task.yaml`` at the data root), ``folds/folds.csv`` and
    ``runs/<bb>/`` for its classes, as cv writes them for that task.

    Returns ``(Paths, data_root, Data)``.
    """
    from kit.data.dataset import load_dataset
    from kit.data.task_synth import write_task_dataset
    from kit.task import as_data

    root = Path(root)
    paths = Paths.from_root(root / "work")
    data = as_data(write_task_dataset(root / "data", layout, seed=seed, n_train=n_train,
                                      n_test=n_test, short_side=32))
    task = data.task
    ds = load_dataset(data, check_pixels=False, task=task)
    ids = [s.id for s in ds.train]
    labels = [s.label for s in ds.train]
    test_ids = sorted(s.id for s in ds.test)
    y = np.array([task.classes.index(v) for v in labels])
    rng = np.random.default_rng(seed)
    folds = np.empty(len(ids), dtype=np.int64)
    for k in range(len(task.classes)):
        idx = rng.permutation(np.flatnonzero(y == k))
        folds[idx] = np.arange(len(idx)) % n_folds
    paths.folds_dir.mkdir(parents=True)
    pd.DataFrame({"sample_index": ids, "label": labels, "fold": folds}).to_csv(
        paths.folds_csv, index=False, lineterminator="\n")
    c = len(task.classes)
    y_test = rng.integers(0, c, len(test_ids))
    for bb in backbones:
        out = paths.backbone_dir(bb)
        out.mkdir(parents=True)
        oof, test = (_class_probs(rng, t, c, minority_scale) for t in (y, y_test))
        frame = _frame(ids, oof, folds, labels, task.prob_columns)
        frame.to_csv(out / "oof.csv", index=False, float_format="%.6f", lineterminator="\n")
        _frame(test_ids, test, columns=task.prob_columns).to_csv(
            out / "test.csv", index=False, float_format="%.6f", lineterminator="\n")
        from kit.metrics import bootstrap_ci, score

        value = score(task.metric, y, oof.argmax(axis=1), task.classes)
        ci = bootstrap_ci(y, oof, metric=task.metric, classes=task.classes)
        metrics = {"folds_sha256": sha256_file(paths.folds_csv), "metric": task.metric,
                   "classes": list(task.classes), "oof_score": value,
                   "oof_score_ci95": list(ci), "oof_macro_f1": score("macro_f1", y, oof,
                                                                     task.classes),
                   "per_fold": [{"fold": k, "score": 0.5} for k in range(n_folds)],
                   "per_class": {}, "confusion": [], "config": {"backbone": bb},
                   "weights_source": f"random ({bb})", "versions": {}}
        (out / "metrics.json").write_text(json.dumps(metrics))
    return paths, data.root, data


def _class_probs(rng, y, c: int, minority_scale: float) -> np.ndarray:
    """Probabilities of an imperfect model for labels ``y``: the last class under-predicted."""
    logits = rng.normal(0, 1.0, (len(y), c))
    logits[np.arange(len(y)), y] += 1.5
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p[:, -1] *= minority_scale
    return p / p.sum(axis=1, keepdims=True)


def shifted_problem(n: int = 900, n_models: int = 2, n_folds: int = 5,
                    mix=(0.35, 0.3, 0.2, 0.15), shifted: int = 1, scale: float = 0.15,
                    seed: int = 0) -> dict:
    """OOF probabilities of ``n_models`` imperfect models on ``n`` rows of class mix ``mix``,
    each model's probability of class ``shifted`` scaled by ``scale`` and renormalised: plain
    argmax under-predicts that class, a problem built to need class biases whatever the
    metric (accuracy too: the class is among the frequent ones).

    Returns ``{"oof": M x N x C, "y": N, "folds": N}``.
    """
    rng = np.random.default_rng(seed)
    n_classes = len(mix)
    y = rng.choice(n_classes, size=n, p=np.asarray(mix) / np.sum(mix))
    folds = np.empty(n, dtype=np.int64)
    for k in range(n_classes):  # stratified
        idx = np.flatnonzero(y == k)
        folds[idx] = np.arange(len(idx)) % n_folds
    shared = rng.normal(0, 1.0, (n, n_classes))
    oof = []
    for _ in range(n_models):
        logits = shared + rng.normal(0, 0.8, (n, n_classes))
        logits[np.arange(n), y] += 1.8
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p[:, shifted] *= scale
        oof.append(p / p.sum(axis=1, keepdims=True))
    return {"oof": np.stack(oof), "y": y, "folds": folds}
