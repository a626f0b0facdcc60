"""The blend's decision rule ``argmax(log p + b)`` and its class biases ``b``, tuned by
coordinate ascent on macro F1 (which rewards recall on the small classes plain argmax
under-predicts), optionally for another class mix than the rows'."""
from __future__ import annotations

import numpy as np

from kit.metrics import macro_f1_batch


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


def fit_biases(probs: np.ndarray, y: np.ndarray, cfg: dict,
               class_weight: np.ndarray | None = None) -> np.ndarray:
    """Per-class additive biases on ``log p`` maximising macro F1, by coordinate ascent.

    ``b[0]`` stays 0 (only differences matter). Each step tries every grid value for one
    class at once; among equal scores the value nearest 0 wins (no bias without evidence).
    Sweeps stop when one brings no gain or after ``bias_rounds``. ``class_weight`` (one per
    class) scores macro F1 as if each class's rows were that many times as frequent: biases
    for another class mix.
    """
    c = probs.shape[-1]
    logp = np.log(np.maximum(probs, float(cfg["eps"])))
    grid = bias_grid(cfg)
    b = np.zeros(c)
    if class_weight is None:
        def f1_batch(pred):
            return macro_f1_batch(pred, y, c)
    else:
        def f1_batch(pred):
            return weighted_macro_f1_batch(pred, y, class_weight, c)
    best = float(f1_batch(logp.argmax(axis=1)[None])[0])
    for _ in range(int(cfg["bias_rounds"])):
        gained = False
        for k in range(1, c):
            cand = np.broadcast_to(logp + b, (len(grid),) + logp.shape).copy()
            cand[:, :, k] = logp[None, :, k] + grid[:, None]
            scores = f1_batch(cand.argmax(axis=2))
            top = scores.max()
            ties = np.flatnonzero(scores >= top - 1e-12)
            b[k] = grid[ties[np.argmin(np.abs(grid[ties]))]]
            gained |= top > best + 1e-12
            best = max(best, float(top))
        if not gained:
            break
    return b
