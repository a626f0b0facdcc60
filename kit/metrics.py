"""Image-level aggregation and the challenge metric.

The challenge scores macro F1 over images; the models see patches. ``aggregate`` turns patch
probabilities into one distribution per image, and ``macro_f1`` is the one definition of the
score that every stage (cv, tune, blend) uses.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from kit import CLASSES, PROB_COLUMNS
from kit.utils import atomic_path

AGGREGATIONS = ("mean_prob", "mean_logprob")
_EPS = 1e-7  # keeps log(0) finite for a patch that rules a class out completely


def aggregate(patch_probs, how: str = "mean_prob", k: int | None = None) -> np.ndarray:
    """Image probabilities from patch probabilities.

    Parameters
    ----------
    patch_probs : array, N x K x C, or N*K x C with ``k`` given (rows image-major)
        Probabilities of each patch of each image.
    how : {"mean_prob", "mean_logprob"}
        ``mean_prob``: arithmetic mean of the patch probabilities. ``mean_logprob``: softmax
        of the mean log-probabilities (a normalised geometric mean), which lets confident
        patches veto a class.
    k : int, optional
        Patches per image, needed when ``patch_probs`` is 2-D.

    Returns
    -------
    ndarray, N x C, rows summing to 1.
    """
    p = np.asarray(patch_probs, dtype=np.float64)
    if p.ndim == 2:
        if not k or p.shape[0] % k:
            raise ValueError(f"2-D patch_probs of {p.shape[0]} rows need k dividing it, got k={k}")
        p = p.reshape(p.shape[0] // k, k, p.shape[1])
    if p.ndim != 3:
        raise ValueError(f"patch_probs must be N x K x C or N*K x C, got shape {p.shape}")
    if how == "mean_prob":
        out = p.mean(axis=1)
    elif how == "mean_logprob":
        logp = np.log(np.clip(p, _EPS, 1.0)).mean(axis=1)
        logp -= logp.max(axis=1, keepdims=True)  # stable softmax
        out = np.exp(logp)
    else:
        raise ValueError(f"how must be one of {AGGREGATIONS}, got {how!r}")
    return out / out.sum(axis=1, keepdims=True)


def prob_frame(ids, probs, **front) -> pd.DataFrame:
    """``sample_index``, the ``front`` columns, then one ``p_<class>`` column per class."""
    df = pd.DataFrame({"sample_index": list(ids), **front})
    for j, col in enumerate(PROB_COLUMNS):
        df[col] = probs[:, j]
    return df


def to_indices(y, classes=CLASSES) -> np.ndarray:
    """Class indices from labels (int indices, label strings, or N x C probabilities -> argmax)."""
    y = np.asarray(y)
    if y.ndim == 2:
        return y.argmax(axis=1)
    if y.dtype.kind in "OUS":
        lookup = {c: i for i, c in enumerate(classes)}
        try:
            return np.array([lookup[v] for v in y], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"unknown label {exc.args[0]!r}; expected one of {list(classes)}")
    return y.astype(np.int64)


def macro_f1(y_true, y_pred) -> float:
    """F1 averaged over classes with equal weight: the challenge metric.

    Both arguments take class indices, label strings or N x C probabilities (argmax). As in
    scikit-learn (and Kaggle), the classes averaged are those present in either argument.
    """
    return float(f1_score(to_indices(y_true), to_indices(y_pred), average="macro",
                          zero_division=0))


def macro_f1_batch(pred: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro F1 of each row of ``pred`` (G x N class indices) against ``y`` (N), vectorised.

    Same definition as :func:`macro_f1` without scikit-learn's input checks (20 ms a call, a
    fifth of a features trial): classes absent from both truth and prediction are left out of
    the average.
    """
    f1, present = _f1_counts(pred, y, n_classes)
    return f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1)


def _f1_counts(pred, y, n_classes):
    pred = np.atleast_2d(pred)
    g = pred.shape[0]
    cell = pred + n_classes * np.arange(g)[:, None]
    predicted = np.bincount(cell.ravel(), minlength=g * n_classes).reshape(g, n_classes)
    hits = np.bincount(cell[pred == y[None, :]], minlength=g * n_classes).reshape(g, n_classes)
    denom = predicted + np.bincount(y, minlength=n_classes)[None, :]
    f1 = np.divide(2.0 * hits, denom, out=np.zeros(denom.shape), where=denom > 0)
    return f1, denom > 0


def per_class_f1(y: np.ndarray, pred: np.ndarray, n_classes: int = len(CLASSES)) -> np.ndarray:
    return _f1_counts(pred, y, n_classes)[0][0]


def fast_macro_f1(y_true, y_pred, num_classes: int = len(CLASSES)) -> float:
    """:func:`macro_f1` of one prediction (class indices), through :func:`macro_f1_batch`."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    return float(macro_f1_batch(y_pred[None], y_true, num_classes)[0])


COLLAPSE_SHARE = 0.9


def collapse_reason(y_true, y_pred, max_share: float = COLLAPSE_SHARE) -> str | None:
    """Why a model's predictions look collapsed, or None.

    Collapsed: one class predicted for at least ``max_share`` of the images, or a macro F1 no
    better than always predicting the most frequent true class. Such a model learnt nothing
    that its score can show (e.g. a head on features too small to train on).
    """
    y = to_indices(y_true)
    pred = to_indices(y_pred)
    if len(y) == 0:
        return None
    counts = np.bincount(pred, minlength=len(CLASSES))
    top = int(counts.argmax())
    share = counts[top] / len(pred)
    if share >= max_share:
        return f"predicts {CLASSES[top]} for {share:.0%} of its images"
    majority = np.full_like(y, np.bincount(y, minlength=len(CLASSES)).argmax())
    score, base = macro_f1(y, pred), macro_f1(y, majority)
    if score <= base + 1e-12:
        return (f"macro F1 {score:.3f} is no better than always predicting the most frequent "
                f"class ({base:.3f})")
    return None


def weighted_f1(y_true, y_pred) -> float:
    """F1 averaged over classes weighted by their support (reported, never optimised)."""
    return float(f1_score(to_indices(y_true), to_indices(y_pred), average="weighted",
                          zero_division=0))


def classification_summary(y_true, probs, classes=CLASSES) -> dict:
    """Macro/weighted F1, accuracy, per-class precision/recall/F1/support and confusion matrix.

    The confusion matrix has true classes as rows and predicted classes as columns, in the
    order of ``classes``; everything is plain Python types, ready for JSON.
    """
    t, p = to_indices(y_true, classes), to_indices(probs, classes)
    labels = list(range(len(classes)))
    prec, rec, f1, sup = precision_recall_fscore_support(t, p, labels=labels, zero_division=0)
    return {
        "n": int(len(t)),
        "macro_f1": macro_f1(t, p),
        "weighted_f1": weighted_f1(t, p),
        "accuracy": float(np.mean(t == p)) if len(t) else 0.0,
        "classes": list(classes),
        "per_class": {c: {"precision": float(prec[i]), "recall": float(rec[i]),
                          "f1": float(f1[i]), "support": int(sup[i])}
                      for i, c in enumerate(classes)},
        "confusion": confusion_matrix(t, p, labels=labels).tolist(),
    }


def confusion_figure(cm, classes, title: str | None = None):
    """A matplotlib figure of a confusion matrix (rows true, columns predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(5, 4.4))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), labels=classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    threshold = cm.max() / 2 if cm.size else 0
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > threshold else "black")
    fig.tight_layout()
    return fig


def plot_confusion(cm, classes, path: str | os.PathLike, title: str | None = None) -> None:
    """Save a confusion matrix (rows true, columns predicted) as a PNG, atomically."""
    import matplotlib.pyplot as plt

    fig = confusion_figure(cm, classes, title)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
