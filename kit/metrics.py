"""Image-level aggregation and the competition metrics.

The challenge scores macro F1 over images; the models see patches. ``aggregate`` turns patch
probabilities into one distribution per image, and ``macro_f1`` is the one definition of the
score that every stage (cv, tune, blend) uses. :data:`METRICS` names the five metrics a task
may be scored by (``macro_f1``, ``balanced_accuracy``, ``accuracy``, ``weighted_f1``,
``quadratic_kappa``), each with a vectorised form for the bootstrap intervals.

The module stays light (numpy only at import): the task model imports it, and scikit-learn
and pandas load when a function needs them.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

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


def prob_frame(ids, probs, *, classes=None, **front):
    """``sample_index``, the ``front`` columns, then one ``p_<class>`` column per class
    (``classes``: a task's classes; default the kit's)."""
    import pandas as pd

    columns = PROB_COLUMNS if classes is None else [f"p_{c}" for c in classes]
    df = pd.DataFrame({"sample_index": list(ids), **front})
    for j, col in enumerate(columns):
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
            raise ValueError(f"unknown label {exc.args[0]!r}; "
                             f"expected one of {list(classes)}") from None
    return y.astype(np.int64)


def macro_f1(y_true, y_pred) -> float:
    """F1 averaged over classes with equal weight: the challenge metric.

    Both arguments take class indices, label strings or N x C probabilities (argmax). As in
    scikit-learn (and Kaggle), the classes averaged are those present in either argument.
    """
    from sklearn.metrics import f1_score

    return float(f1_score(to_indices(y_true), to_indices(y_pred), average="macro",
                          zero_division=0))


def macro_f1_batch(pred: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro F1 of each row of ``pred`` (G x N class indices) against ``y``, vectorised:
    ``y`` is one truth for every row (N) or a truth per row (G x N, as bootstrap resamples).

    Same definition as :func:`macro_f1` without scikit-learn's input checks (20 ms a call, a
    fifth of a features trial): classes absent from both truth and prediction are left out of
    the average.
    """
    f1, present = _f1_counts(pred, y, n_classes)
    return f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1)


def _f1_counts(pred, y, n_classes):
    pred = np.atleast_2d(pred)
    g = pred.shape[0]
    offset = n_classes * np.arange(g)[:, None]
    cell = pred + offset
    size = g * n_classes
    predicted = np.bincount(cell.ravel(), minlength=size).reshape(g, n_classes)
    hits = np.bincount(cell[pred == y], minlength=size).reshape(g, n_classes)
    if y.ndim == 1:
        actual = np.bincount(y, minlength=n_classes)[None, :]
    else:
        actual = np.bincount((y + offset).ravel(), minlength=size).reshape(g, n_classes)
    denom = predicted + actual
    f1 = np.divide(2.0 * hits, denom, out=np.zeros(denom.shape), where=denom > 0)
    return f1, denom > 0


def per_class_f1(y: np.ndarray, pred: np.ndarray, n_classes: int = len(CLASSES)) -> np.ndarray:
    return _f1_counts(pred, y, n_classes)[0][0]


def fast_macro_f1(y_true, y_pred, num_classes: int = len(CLASSES)) -> float:
    """:func:`macro_f1` of one prediction (class indices), through :func:`macro_f1_batch`."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    return float(macro_f1_batch(y_pred[None], y_true, num_classes)[0])


# --------------------------------------------------------------------------- the registry
def _confusion_batch(pred, y, n_classes: int) -> np.ndarray:
    """Confusion counts of each row of ``pred`` (G x N) against ``y`` (N or G x N):
    G x C x C, true classes as rows."""
    pred = np.atleast_2d(pred)
    g = pred.shape[0]
    y = np.broadcast_to(y, pred.shape)
    cell = (y * n_classes + pred) + (n_classes * n_classes) * np.arange(g)[:, None]
    return np.bincount(cell.ravel(), minlength=g * n_classes * n_classes).reshape(
        g, n_classes, n_classes)


def accuracy_batch(pred, y, n_classes: int) -> np.ndarray:
    """Share of images predicted right, per row of ``pred`` (0 for no images)."""
    pred = np.atleast_2d(pred)
    return (pred == y).sum(axis=1) / max(pred.shape[1], 1)


def balanced_accuracy_batch(pred, y, n_classes: int) -> np.ndarray:
    """Recall averaged over the classes present in the truth (scikit-learn's
    ``balanced_accuracy_score``), per row of ``pred``."""
    cm = _confusion_batch(pred, y, n_classes)
    support = cm.sum(axis=2)
    recall = np.divide(np.diagonal(cm, axis1=1, axis2=2), support,
                       out=np.zeros(support.shape), where=support > 0)
    return recall.sum(axis=1) / np.maximum((support > 0).sum(axis=1), 1)


def weighted_f1_batch(pred, y, n_classes: int) -> np.ndarray:
    """F1 per class weighted by its true support, per row of ``pred`` (scikit-learn's
    ``f1_score(average="weighted", zero_division=0)``)."""
    cm = _confusion_batch(pred, y, n_classes)
    actual, predicted = cm.sum(axis=2), cm.sum(axis=1)
    denom = actual + predicted
    f1 = np.divide(2.0 * np.diagonal(cm, axis1=1, axis2=2), denom, out=np.zeros(denom.shape),
                   where=denom > 0)
    return (f1 * actual).sum(axis=1) / np.maximum(actual.sum(axis=1), 1)


def quadratic_kappa_batch(pred, y, n_classes: int) -> np.ndarray:
    """Cohen's kappa with quadratic weights over the class order, per row of ``pred``.

    Weights ``(i - j)^2`` use the positions of the task's classes, so a class absent from a
    sample still counts in the distances (scikit-learn's ``cohen_kappa_score(...,
    weights="quadratic", labels=range(C))``). Undefined kappa (one class in both truth and
    prediction) scores 0, as ``replace_undefined_by=0.0``.
    """
    cm = _confusion_batch(pred, y, n_classes).astype(np.float64)
    n = cm.sum(axis=(1, 2))
    expected = (np.einsum("gi,gj->gij", cm.sum(axis=2), cm.sum(axis=1))
                / np.maximum(n, 1)[:, None, None])
    k = np.arange(n_classes)
    w = (k[:, None] - k[None, :]) ** 2.0
    num = (cm * w).sum(axis=(1, 2))
    den = (expected * w).sum(axis=(1, 2))
    return np.where(den > 0, 1.0 - num / np.where(den > 0, den, 1.0), 0.0)


@dataclass(frozen=True)
class Metric:
    """One competition metric: its name, how it prints, and its vectorised form.

    ``batch(pred, y, n_classes)`` scores each row of ``pred`` (G x N class indices) against
    ``y`` (N, or G x N for bootstrap resamples); calling the metric scores one prediction.
    """

    name: str
    title: str
    batch: Callable[[np.ndarray, np.ndarray, int], np.ndarray]
    single: Callable | None = None  # the reference one-prediction form, when it differs

    def __call__(self, y_true, y_pred, classes=CLASSES) -> float:
        """The score of ``y_pred`` against ``y_true`` (class indices, labels of ``classes``
        or N x C probabilities)."""
        y, pred = _pair(y_true, y_pred, classes, self.name)
        if self.single is not None:
            return float(self.single(y, pred))
        return float(self.batch(pred[None], y, len(classes))[0])


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("macro_f1", "macro F1", macro_f1_batch, single=macro_f1),
    Metric("balanced_accuracy", "balanced accuracy", balanced_accuracy_batch),
    Metric("accuracy", "accuracy", accuracy_batch),
    Metric("weighted_f1", "weighted F1", weighted_f1_batch),
    Metric("quadratic_kappa", "quadratic kappa", quadratic_kappa_batch),
)}


def get_metric(name: str) -> Metric:
    """The metric called ``name``; a one-line error listing the known ones otherwise."""
    if isinstance(name, Metric):
        return name
    if name not in METRICS:
        from kit.utils import KitError

        raise KitError(f"unknown metric {name!r}; use one of {', '.join(METRICS)}")
    return METRICS[name]


def score(metric: str, y_true, y_pred, classes=CLASSES) -> float:
    """``metric`` (a name of :data:`METRICS`) of one prediction."""
    return get_metric(metric)(y_true, y_pred, classes)


def _pair(y_true, y_pred, classes, what: str):
    y, pred = to_indices(y_true, classes), to_indices(y_pred, classes)
    if len(y) != len(pred):  # indexing both with the same rows would pair other images
        raise ValueError(f"{what}: {len(y)} labels but {len(pred)} predictions")
    top = max(int(y.max(initial=-1)), int(pred.max(initial=-1)))
    if top >= len(classes) or min(int(y.min(initial=0)), int(pred.min(initial=0))) < 0:
        raise ValueError(f"{what}: class index {top} outside 0..{len(classes) - 1}")
    return y, pred


# --------------------------------------------------------------------------- intervals
N_BOOT = 1000
BOOT_SEED = 0


def _boot_indices(n: int, n_boot: int, seed) -> np.ndarray:
    """``n_boot x n`` row indices drawn with replacement."""
    from kit.utils import check_random_state

    return check_random_state(seed).integers(0, n, size=(int(n_boot), n))


def _classes_for(classes, num_classes: int) -> tuple[tuple, int]:
    """The names label strings are looked up in, and the class count: a task's classes, or
    the kit's names with ``num_classes``."""
    return (CLASSES, num_classes) if classes is None else (tuple(classes), len(classes))


def bootstrap_ci(y_true, y_pred, n_boot: int = N_BOOT, seed=BOOT_SEED, level: float = 0.95,
                 num_classes: int = len(CLASSES), metric: str = "macro_f1",
                 classes=None) -> tuple[float, float]:
    """Percentile bootstrap interval of a metric over images (default: :func:`macro_f1`).

    Images are resampled with replacement ``n_boot`` times (seeded: the same inputs give the
    same interval); each resample is scored with the metric. It measures how much the score
    would move on another draw of images of the same kind, not the training noise.

    Parameters
    ----------
    y_true, y_pred : class indices, label strings or N x C probabilities (argmax)
    n_boot : int
    seed : int
    level : float
        Coverage of the interval (0.95: the 2.5th and 97.5th percentiles).
    num_classes : int
        Number of classes (ignored when ``classes`` is given).
    metric : str
        A name of :data:`METRICS`.
    classes : sequence of str, optional
        The task's classes, for label strings (default: the kit's).

    Returns
    -------
    (lo, hi) : floats; ``(nan, nan)`` for no images.
    """
    m = get_metric(metric)
    names, c = _classes_for(classes, num_classes)
    y, pred = to_indices(y_true, names), to_indices(y_pred, names)
    if len(y) != len(pred):  # indexing both with the same rows would pair other images
        raise ValueError(f"bootstrap_ci: {len(y)} labels but {len(pred)} predictions")
    if len(y) == 0:
        return float("nan"), float("nan")
    idx = _boot_indices(len(y), n_boot, seed)
    scores = m.batch(pred[idx], y[idx], c)
    a = (1 - level) / 2
    lo, hi = np.quantile(scores, [a, 1 - a])
    return float(lo), float(hi)


def paired_bootstrap(y_true, pred_a, pred_b, n_boot: int = N_BOOT, seed=BOOT_SEED,
                     level: float = 0.95, num_classes: int = len(CLASSES),
                     metric: str = "macro_f1", classes=None) -> dict:
    """Paired bootstrap of a metric's difference B - A on the same images (default macro F1).

    Each resample draws the same images for both predictions, so what the two share (hard
    images, label noise) cancels out of the difference. ``metric`` and ``classes`` as in
    :func:`bootstrap_ci`.

    Returns
    -------
    dict
        ``a``, ``b``, ``diff`` (B - A on all images), ``ci95`` ([lo, hi] of the difference),
        ``p_b_better`` (share of resamples where B scores above A; ties count half), ``n``.
    """
    m = get_metric(metric)
    names, c = _classes_for(classes, num_classes)
    y, pa, pb = to_indices(y_true, names), to_indices(pred_a, names), to_indices(pred_b, names)
    if not len(y) == len(pa) == len(pb):
        raise ValueError(f"paired_bootstrap: {len(y)} labels, {len(pa)} and {len(pb)} "
                         "predictions")
    if len(y) == 0:
        raise ValueError("paired_bootstrap: no images to compare")
    idx = _boot_indices(len(y), n_boot, seed)
    fa = m.batch(pa[idx], y[idx], c)
    fb = m.batch(pb[idx], y[idx], c)
    d = fb - fa
    a = (1 - level) / 2
    lo, hi = np.quantile(d, [a, 1 - a])
    score_a, score_b = (float(m.batch(p[None], y, c)[0]) for p in (pa, pb))
    return {"a": score_a, "b": score_b, "diff": score_b - score_a,
            "ci95": [float(lo), float(hi)],
            "p_b_better": float((d > 0).mean() + 0.5 * (d == 0).mean()), "n": int(len(y)),
            "n_boot": int(n_boot)}


def format_ci(score: float, ci) -> str:
    """``0.499 [0.46, 0.54]``: a score with its interval, as every stage prints it."""
    if ci is None or any(v != v for v in ci):
        return f"{score:.3f}"
    return f"{score:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


COLLAPSE_SHARE = 0.9


def collapse_reason(y_true, y_pred, max_share: float = COLLAPSE_SHARE, classes=CLASSES,
                    metric: str = "macro_f1") -> str | None:
    """Why a model's predictions look collapsed, or None.

    Collapsed: one class predicted for at least ``max_share`` of the images, or a ``metric``
    score no better than always predicting the most frequent true class. Such a model learnt
    nothing that its score can show (e.g. a head on features too small to train on).
    """
    m = get_metric(metric)
    y = to_indices(y_true, classes)
    pred = to_indices(y_pred, classes)
    if len(y) == 0:
        return None
    counts = np.bincount(pred, minlength=len(classes))
    top = int(counts.argmax())
    share = counts[top] / len(pred)
    if share >= max_share:
        return f"predicts {classes[top]} for {share:.0%} of its images"
    majority = np.full_like(y, np.bincount(y, minlength=len(classes)).argmax())
    got, base = m(y, pred, classes), m(y, majority, classes)
    if got <= base + 1e-12:
        return (f"{m.title} {got:.3f} is no better than always predicting the most frequent "
                f"class ({base:.3f})")
    return None


def weighted_f1(y_true, y_pred) -> float:
    """F1 averaged over classes weighted by their support (reported, never optimised)."""
    from sklearn.metrics import f1_score

    return float(f1_score(to_indices(y_true), to_indices(y_pred), average="weighted",
                          zero_division=0))


def classification_summary(y_true, probs, classes=CLASSES) -> dict:
    """Macro/weighted F1, accuracy, per-class precision/recall/F1/support and confusion matrix.

    The confusion matrix has true classes as rows and predicted classes as columns, in the
    order of ``classes``; everything is plain Python types, ready for JSON.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

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
