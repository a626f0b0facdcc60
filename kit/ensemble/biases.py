"""The blend's decision rule ``argmax(log p + b)`` and its class biases ``b``, tuned by
coordinate ascent on the task's metric (for macro F1 they buy recall on the small classes
plain argmax under-predicts), optionally for another class mix than the rows'.

Every metric a task may name is a function of the confusion matrix, so "score as if the
class mix were another" is the same for all of them: count each row ``class_weight[y]``
times (:func:`weighted_metric_batch`). That is what ``prior: em`` needs.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kit.metrics import get_metric, macro_f1_batch


def apply_rule(probs: np.ndarray, biases: np.ndarray, eps: float) -> np.ndarray:
    """Class indices ``argmax(log p + b)``."""
    return (np.log(np.maximum(probs, eps)) + biases).argmax(axis=-1)


def bias_grid(cfg: dict) -> np.ndarray:
    grid = np.linspace(float(cfg["bias_low"]), float(cfg["bias_high"]), int(cfg["bias_steps"]))
    return np.round(grid, 10)


def weighted_macro_f1_batch(pred: np.ndarray, y: np.ndarray, class_weight: np.ndarray,
                            n_classes: int) -> np.ndarray:
    """:func:`~kit.metrics.macro_f1_batch` with each row counted ``class_weight[y]`` times:
    the expected macro F1 on a set whose class mix is the rows' mix times ``class_weight``."""
    pred = np.atleast_2d(pred)
    g = pred.shape[0]
    w = np.broadcast_to(np.asarray(class_weight, np.float64)[y], pred.shape)
    cell = pred + n_classes * np.arange(g)[:, None]
    size = g * n_classes
    predicted = np.bincount(cell.ravel(), w.ravel(), minlength=size).reshape(g, n_classes)
    hit = pred == y[None, :]
    hits = np.bincount(cell[hit], w[hit], minlength=size).reshape(g, n_classes)
    denom = predicted + np.bincount(y, w[0], minlength=n_classes)[None, :]
    present = denom > 0
    f1 = np.divide(2.0 * hits, denom, out=np.zeros(denom.shape), where=present)
    return f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1)


def weighted_confusion(pred: np.ndarray, y: np.ndarray, class_weight: np.ndarray,
                       n_classes: int) -> np.ndarray:
    """Confusion counts (G x C x C, true classes as rows) of each row of ``pred`` (G x N)
    against ``y`` (N), each image counted ``class_weight[y]`` times."""
    pred = np.atleast_2d(pred)
    g = pred.shape[0]
    w = np.broadcast_to(np.asarray(class_weight, np.float64)[y], pred.shape)
    cell = (y[None, :] * n_classes + pred) + (n_classes * n_classes) * np.arange(g)[:, None]
    return np.bincount(cell.ravel(), w.ravel(), minlength=g * n_classes * n_classes).reshape(
        g, n_classes, n_classes)


def _ratio(num, den):
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def confusion_scores(metric: str, cm: np.ndarray) -> np.ndarray:
    """``metric`` of each confusion matrix of ``cm`` (G x C x C, counts or weights), with the
    conventions of :data:`kit.metrics.METRICS` (classes absent from truth and prediction left
    out of macro F1, from the truth out of balanced accuracy; undefined kappa scores 0)."""
    cm = np.asarray(cm, np.float64)
    actual, predicted = cm.sum(axis=2), cm.sum(axis=1)
    hits = np.diagonal(cm, axis1=1, axis2=2)
    total = actual.sum(axis=1)
    name = get_metric(metric).name
    if name == "accuracy":
        return _ratio(hits.sum(axis=1), total)
    if name == "balanced_accuracy":
        return _ratio(_ratio(hits, actual).sum(axis=1), (actual > 0).sum(axis=1))
    f1 = _ratio(2.0 * hits, actual + predicted)
    if name == "macro_f1":
        return f1.sum(axis=1) / np.maximum((actual + predicted > 0).sum(axis=1), 1)
    if name == "weighted_f1":
        return _ratio((f1 * actual).sum(axis=1), total)
    if name == "quadratic_kappa":
        c = cm.shape[-1]
        k = np.arange(c)
        w = (k[:, None] - k[None, :]) ** 2.0
        expected = np.einsum("gi,gj->gij", actual, predicted) / np.where(total > 0, total, 1)[
            :, None, None]
        den = (expected * w).sum(axis=(1, 2))
        return np.where(den > 0, 1.0 - (cm * w).sum(axis=(1, 2)) / np.where(den > 0, den, 1.0),
                        0.0)
    raise ValueError(f"confusion_scores: no confusion form for metric {name!r}")


def weighted_metric_batch(metric: str, pred: np.ndarray, y: np.ndarray,
                          class_weight: np.ndarray, n_classes: int) -> np.ndarray:
    """``metric`` of each row of ``pred`` with each image counted ``class_weight[y]`` times:
    its expected value on a set whose class mix is the rows' mix times ``class_weight``."""
    if get_metric(metric).name == "macro_f1":  # the form the blend has always used
        return weighted_macro_f1_batch(pred, y, class_weight, n_classes)
    return confusion_scores(metric, weighted_confusion(pred, y, class_weight, n_classes))


def metric_scorer(metric: str, y: np.ndarray, n_classes: int,
                  class_weight: np.ndarray | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """``pred (G x N) -> G scores`` of ``metric`` against ``y``, rows counted
    ``class_weight[y]`` times when given."""
    m = get_metric(metric)
    if class_weight is None:
        batch = macro_f1_batch if m.name == "macro_f1" else m.batch
        return lambda pred: batch(pred, y, n_classes)
    return lambda pred: weighted_metric_batch(m.name, pred, y, class_weight, n_classes)


def fit_biases(probs: np.ndarray, y: np.ndarray, cfg: dict,
               class_weight: np.ndarray | None = None, metric: str = "macro_f1") -> np.ndarray:
    """Per-class additive biases on ``log p`` maximising ``metric``, by coordinate ascent.

    ``b[0]`` stays 0 (only differences matter). Each step tries every grid value for one
    class at once; among equal scores the value nearest 0 wins (no bias without evidence).
    Sweeps stop when one brings no gain or after ``bias_rounds``. ``class_weight`` (one per
    class) scores the metric as if each class's rows were that many times as frequent:
    biases for another class mix.
    """
    c = probs.shape[-1]
    logp = np.log(np.maximum(probs, float(cfg["eps"])))
    grid = bias_grid(cfg)
    b = np.zeros(c)
    score_batch = metric_scorer(metric, y, c, class_weight)
    best = float(score_batch(logp.argmax(axis=1)[None])[0])
    for _ in range(int(cfg["bias_rounds"])):
        gained = False
        for k in range(1, c):
            cand = np.broadcast_to(logp + b, (len(grid),) + logp.shape).copy()
            cand[:, :, k] = logp[None, :, k] + grid[:, None]
            scores = score_batch(cand.argmax(axis=2))
            top = scores.max()
            ties = np.flatnonzero(scores >= top - 1e-12)
            b[k] = grid[ties[np.argmin(np.abs(grid[ties]))]]
            gained |= top > best + 1e-12
            best = max(best, float(top))
        if not gained:
            break
    return b
