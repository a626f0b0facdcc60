"""The linear probe (``head.type: logreg``): scikit-learn's LogisticRegression on the
standardised, image-mean embeddings of a fold's training images.

The standard probe of pathology benchmarks: class-balanced, its inverse regularisation ``C``
chosen on the same inner split that early stopping uses (never on the fold's own images),
then refitted on all the fold's training images. Seconds per fold on cached embeddings.
The fitted coefficients are copied into a :class:`kit.models.heads.LinearProbe`, so the
probe predicts, checkpoints and reloads like any other head.
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from kit.metrics import get_metric
from kit.training.selection import FoldResult, inner_split
from kit.utils import KitError

# Inverse regularisation strengths tried on the inner split (standardised features of a few
# hundred dimensions and a few hundred images want strong regularisation).
C_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
MAX_ITER = 2000
# Logit given to a class absent from a fold's training images (it is never predicted).
ABSENT_LOGIT = -30.0


def image_means(source, head, rows) -> np.ndarray:
    """``n x V x D`` standardised embeddings of ``rows``, averaged over each image's patches."""
    x = source.x[torch.from_numpy(np.array(rows, dtype=np.int64))].float()  # n x K x V x D
    if len(head) > 1:  # a Standardize layer first
        x = head[0](x)
    return x.mean(1).numpy()


def _classifier(C: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=float(C), class_weight="balanced", max_iter=MAX_ITER)


def _fit(X: np.ndarray, y: np.ndarray, C: float, weight=None):
    """Fit on every view of each image (the views are the probe's augmentation)."""
    n, v, d = X.shape
    w = None if weight is None else np.repeat(np.asarray(weight, np.float64), v)
    clf = _classifier(C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at tiny C on tiny sets
        clf.fit(X.reshape(n * v, d), np.repeat(y, v), sample_weight=w)
    return clf


def _logits_matrix(clf, num_classes: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``C x D`` and biases ``C`` over every class from a fitted classifier (which
    knows only the classes it saw; two classes come as one row)."""
    coef = np.zeros((num_classes, d))
    bias = np.full(num_classes, ABSENT_LOGIT)
    seen = np.asarray(clf.classes_, np.int64)
    if len(seen) == 1:
        bias[seen[0]] = 0.0
    elif len(seen) == 2:  # binary: p(seen[1]) = sigmoid(w x + b)
        coef[seen[1]], bias[seen[1]], bias[seen[0]] = clf.coef_[0], clf.intercept_[0], 0.0
    else:
        coef[seen], bias[seen] = clf.coef_, clf.intercept_
    return coef, bias


def _predict(clf, X: np.ndarray, num_classes: int) -> np.ndarray:
    """Image probabilities ``n x C`` from the ``id`` view (view 0), as early stopping scores."""
    coef, bias = _logits_matrix(clf, num_classes, X.shape[-1])
    z = X[:, 0] @ coef.T + bias
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def fit_probe(head, source, train_rows, train_y, cfg: dict, *, groups=None, seed: int = 42,
              desc: str = "probe", sample_weight=None, metric: str = "macro_f1"):
    """Fit ``head`` (a :class:`kit.models.heads.LinearProbe`) on ``train_rows`` of ``source``.

    Parameters
    ----------
    head : LinearProbe
    source : kit.training.sources.FeatureSource
        Cached embeddings; the probe has no pixel path.
    train_rows, train_y : int arrays
    cfg : dict
        Resolved training config (``inner_folds``).
    groups : array, optional
        Images the inner split keeps together (a group is never on both sides).
    seed : int
        Draws the inner split.
    sample_weight : array, optional
        Per training image (``label_issues.mode: weight``).
    metric : str
        The task's metric (:data:`kit.metrics.METRICS`), which chooses ``C``.

    Returns
    -------
    kit.training.selection.FoldResult
        ``best_score``: the inner split's ``metric`` at the chosen ``C``; ``history``: one
        record per ``C`` tried (``C``, ``val_<metric>``).
    """
    if not hasattr(source, "x"):
        raise KitError(f"{desc}: head.type logreg trains on cached embeddings only; freeze the "
                       "whole backbone (--train-norm none, no --unfreeze-last) or use head.type "
                       "mlp")
    t0 = time.perf_counter()
    rows = np.asarray(train_rows, np.int64)
    y = np.asarray(train_y, np.int64)
    if len(rows) == 0:
        raise KitError(f"{desc}: no training images")
    n_classes = head.linear.out_features
    weight = None if sample_weight is None else np.asarray(sample_weight, np.float64)
    if len(head) > 1:
        head[0].fit(source.features(head, rows))
    X = image_means(source, head, rows)
    n_splits = int(cfg["inner_folds"])
    fit_pos, stop_pos = inner_split(y, groups, n_splits, seed)
    scorer, key = get_metric(metric).batch, f"val_{metric}"
    history = []
    for C in C_GRID:
        clf = _fit(X[fit_pos], y[fit_pos], C, None if weight is None else weight[fit_pos])
        pred = _predict(clf, X[stop_pos], n_classes).argmax(1)
        history.append({"C": C, key: float(scorer(pred[None], y[stop_pos], n_classes)[0])})
    best = max(history, key=lambda h: h[key])  # first (smallest C) on ties
    clf = _fit(X, y, best["C"], weight)
    coef, bias = _logits_matrix(clf, n_classes, X.shape[-1])
    with torch.no_grad():
        head.linear.weight.copy_(torch.as_tensor(coef, dtype=torch.float32))
        head.linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    head.eval()
    selection = {"early_stopping": "probe", "epochs_honest": True,
                 "stop": "inner split of the training images", "inner_folds": n_splits,
                 "inner_seed": int(seed), "stop_positions": stop_pos.tolist(),
                 "chosen_C": best["C"], "stop_score": best[key],
                 "n_fit": int(len(rows)), "n_stop": int(len(stop_pos)), "standardized": True}
    return FoldResult(model=head, best_epoch=0, best_score=best[key], epochs=0,
                      seconds=time.perf_counter() - t0, history=history,
                      n_trainable=sum(p.numel() for p in head.parameters()),
                      selection=selection)
