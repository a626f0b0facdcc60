"""The blend's weights over a library of models: Caruana-style greedy forward selection with
replacement (Caruana et al., 2004), optionally bagged over bootstrap resamples of the rows.

It needs no gradient, so it optimises the task's metric (macro F1, balanced accuracy, ...:
piecewise constant in the weights) directly; ``objective="logloss"`` optimises log-loss
instead. Every step is vectorised over the
candidates (numpy).
"""
from __future__ import annotations

import numpy as np

from kit.metrics import get_metric
from kit.utils import KitError

METRIC_OBJECTIVES = ("f1", "metric")  # the task's metric; "f1" from when it was macro F1 alone


def _score_batch(probs: np.ndarray, y: np.ndarray, objective: str, eps: float,
                 metric: str = "macro_f1") -> np.ndarray:
    """Higher-is-better score of each candidate blend (G x N x C): ``metric`` of its argmax,
    or with ``objective="logloss"`` minus its log-loss."""
    if objective in METRIC_OBJECTIVES:
        return get_metric(metric).batch(probs.argmax(axis=-1), y, probs.shape[-1])
    picked = np.take_along_axis(probs, y[None, :, None], axis=-1)[..., 0]
    return np.log(np.maximum(picked, eps)).mean(axis=-1)  # minus the log-loss


def greedy_weights(P: np.ndarray, y: np.ndarray, objective: str = "f1", iterations: int = 40,
                   init: str = "both", init_size: int = 1, eps: float = 1e-6,
                   metric: str = "macro_f1"):
    """Caruana greedy forward selection with replacement over the models of ``P`` (M x N x C).

    Returns ``(weights, score)``: the best prefix of the selection path (earliest on ties).
    ``init="equal"`` starts from every model once, ``"best"`` from the ``init_size`` best
    single models, ``"both"`` runs both paths and keeps the better (the equal start on ties):
    the result then never scores below equal weights nor the best single model on these rows.
    ``metric``: what ``objective="f1"`` (or ``"metric"``) scores, a name of
    :data:`kit.metrics.METRICS`.
    """
    results = [_greedy_path(P, y, objective, iterations, counts, eps, metric)
               for counts in _start_counts(P, y, objective, init, init_size, eps, metric)]
    return max(results, key=lambda r: r[1])  # max keeps the first of equal scores


def _greedy_path(P, y, objective, iterations, counts, eps, metric):
    counts = counts.copy()
    total = np.tensordot(counts, P, axes=1)
    best_counts = counts.copy()
    best = float(_score_batch((total / counts.sum())[None], y, objective, eps, metric)[0])
    for _ in range(iterations if P.shape[0] > 1 else 0):
        scores = _score_batch((total[None] + P) / (counts.sum() + 1), y, objective, eps, metric)
        j = int(np.argmax(scores))
        counts[j] += 1
        total += P[j]
        if scores[j] > best + 1e-12:
            best, best_counts = float(scores[j]), counts.copy()
    return best_counts / best_counts.sum(), best


def _start_counts(P, y, objective, init, init_size, eps, metric) -> list[np.ndarray]:
    """Where the greedy paths start: every model once and/or the ``init_size`` best singles."""
    if init not in ("equal", "best", "both"):
        raise KitError(f"blend config: init must be 'equal', 'best' or 'both', got {init!r}")
    starts = []
    if init in ("equal", "both"):
        starts.append(np.ones(P.shape[0]))
    if init in ("best", "both"):
        singles = _score_batch(P, y, objective, eps, metric)
        counts = np.zeros(P.shape[0])
        counts[np.argsort(-singles, kind="stable")[:max(1, init_size)]] = 1
        starts.append(counts)
    return starts


def fit_weights(P, y, cfg: dict, objective: str, rng, metric: str = "macro_f1") -> np.ndarray:
    """Weights from the greedy search, bagged over bootstrap row resamples when ``bags > 0``."""
    kw = dict(objective=objective, iterations=int(cfg["iterations"]), init=cfg["init"],
              init_size=int(cfg["init_size"]), eps=float(cfg["eps"]), metric=metric)
    bags = int(cfg["bags"])
    if bags <= 0 or P.shape[0] == 1:
        return greedy_weights(P, y, **kw)[0]
    n = P.shape[1]
    bagged = np.mean([greedy_weights(P[:, idx], y[idx], **kw)[0]
                      for idx in (rng.integers(0, n, n) for _ in range(bags))], axis=0)
    # Never worse than where the paths start, on the rows the weights are fitted on.
    starts = [c / c.sum() for c in _start_counts(P, y, objective, cfg["init"],
                                                 int(cfg["init_size"]), float(cfg["eps"]),
                                                 metric)]
    scores = _score_batch(np.tensordot(np.stack([bagged] + starts), P, axes=1), y, objective,
                          float(cfg["eps"]), metric)
    return ([bagged] + starts)[int(np.argmax(scores))]
