"""The public/private shake-up, estimated from a submission's nested out-of-fold rows.

Kaggle scores a random part of the test set (the public fraction) during the competition and
ranks by the rest. Both parts are small samples of images, so the public score of a
submission moves away from its private score by chance alone. The nested OOF rows of a blend
are predictions on images whose labels the kit holds, made without those images having
chosen anything: drawn in test-set-sized sets and split like Kaggle splits the test set, they
show how far public and private scores drift apart, and how far one submission's private
score may fall from another's.

Every function takes ``score(y, pred) -> float`` (the task's metric on class indices) and a
seed; the same inputs give the same numbers. :func:`shakeup_record` is what the blend stores
under the manifest's ``shakeup`` key, and :func:`write_nested_oof` the nested OOF rows it keeps
beside each submission (``submissions/<stem>.oof.csv``) so that two submissions can be
compared later (:mod:`kit.submission.choose`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from kit.metrics import BOOT_SEED, N_BOOT, get_metric, to_indices
from kit.utils import KitError, atomic_write_csv, check_random_state, read_csv_columns

Score = Callable[[np.ndarray, np.ndarray], float]
N_DRAWS = 2000
SEED = 0
# The share of the test set Kaggle scores on the public leaderboard when the task does not
# say (kit/task.py has no such key yet). An assumption: 30 % public / 70 % private is
# Kaggle's most common random split, and a course competition's host rarely changes it.
DEFAULT_PUBLIC_FRACTION = 0.3
OOF_SUFFIX = ".oof.csv"
OOF_COLUMNS = ("sample_index", "label", "pred")


def _sizes(n_test: int, public_fraction: float) -> tuple[int, int]:
    if not 0 < public_fraction < 1:
        raise ValueError(f"public_fraction must be in (0, 1) (got {public_fraction})")
    n_public = int(round(n_test * public_fraction))
    if n_public < 1 or n_public >= n_test:
        raise ValueError(f"{n_test} test images with a public fraction of {public_fraction} "
                         "leave a part empty")
    return n_public, n_test - n_public


def _test_sets(n_rows: int, n_test: int, n_draws: int, rng) -> np.ndarray:
    """``n_draws x n_test`` row indices: test sets drawn from the OOF rows with replacement.

    The OOF rows stand for the population the test set was drawn from. Drawing without
    replacement would shrink each part's spread by the finite-population factor
    sqrt(1 - n / n_rows) (about 0.65 for a 334-image private part of 581 rows), making the
    public score look more precise and P(A beats B) surer than they are.
    """
    return rng.integers(0, n_rows, size=(n_draws, n_test))


def public_private_spread(y, pred, score: Score, n_test: int, public_fraction: float,
                          n_draws: int = N_DRAWS, seed=SEED) -> dict:
    """How public and private scores of one submission differ by the draw of images.

    Returns
    -------
    dict
        ``sd_public_minus_private`` (the standard deviation of public - private),
        ``sd_public`` and ``sd_private`` (each part's score spread), ``public_fraction``,
        ``n_test``, ``n_rows`` (OOF rows drawn from), ``n_draws``.
    """
    y, pred = np.asarray(y), np.asarray(pred)
    n_public, _ = _sizes(n_test, public_fraction)
    rng = check_random_state(seed)
    pub, priv = np.empty(n_draws), np.empty(n_draws)
    for i, rows in enumerate(_test_sets(len(y), n_test, n_draws, rng)):
        a, b = rows[:n_public], rows[n_public:]
        pub[i], priv[i] = score(y[a], pred[a]), score(y[b], pred[b])
    return {"public_fraction": float(public_fraction), "n_test": int(n_test),
            "n_rows": int(len(y)), "n_draws": int(n_draws),
            "sd_public_minus_private": float(np.std(pub - priv, ddof=1)),
            "sd_public": float(np.std(pub, ddof=1)), "sd_private": float(np.std(priv, ddof=1))}


def split_spread(y, pred, score: Score, public_fraction: float, n_draws: int = N_DRAWS,
                 seed=SEED) -> float:
    """The spread of public - private over random splits of one fixed, labelled test set:
    what :func:`public_private_spread` estimates without the test labels (its check)."""
    y, pred = np.asarray(y), np.asarray(pred)
    n_public, _ = _sizes(len(y), public_fraction)
    rng = check_random_state(seed)
    diffs = np.empty(n_draws)
    for i in range(n_draws):
        rows = rng.permutation(len(y))
        a, b = rows[:n_public], rows[n_public:]
        diffs[i] = score(y[a], pred[a]) - score(y[b], pred[b])
    return float(np.std(diffs, ddof=1))


def private_estimate(expected: float, expected_se: float, public: float | None, spread: dict,
                     level: float = 0.95) -> dict:
    """The private score expected from the nested score and a public score together.

    Both estimate the submission's true score: the nested score with its bootstrap standard
    error, the public score with the spread of a public part (``spread["sd_public"]``). Each
    is weighted by its precision; the private part adds its own sampling spread to the
    interval. Without a public score (None) the nested score stands alone.

    Returns
    -------
    dict
        ``estimate``, ``ci`` ([lo, hi]), ``weight_public`` (the public score's share).
    """
    var_e = max(expected_se, 1e-9) ** 2
    if public is None:
        w_pub, mean, var_mean = 0.0, float(expected), var_e
    else:
        var_p = max(spread["sd_public"], 1e-9) ** 2
        w_pub = (1 / var_p) / (1 / var_e + 1 / var_p)
        mean = (1 - w_pub) * expected + w_pub * public
        var_mean = 1 / (1 / var_e + 1 / var_p)
    half = _z(level) * math.sqrt(var_mean + spread["sd_private"] ** 2)
    return {"estimate": float(mean), "ci": [float(mean - half), float(mean + half)],
            "weight_public": float(w_pub)}


def p_beats(y, pred_a, pred_b, score: Score, n_test: int, public_fraction: float,
            n_draws: int = N_DRAWS, seed=SEED) -> float:
    """P(A scores above B on the private part): both scored on the same drawn private sets
    of OOF rows (paired), ties counted half."""
    y, pa, pb = np.asarray(y), np.asarray(pred_a), np.asarray(pred_b)
    n_public, n_private = _sizes(n_test, public_fraction)
    rng = check_random_state(seed)
    wins = 0.0
    for rows in _test_sets(len(y), n_test, n_draws, rng):
        b = rows[n_public:]
        sa, sb = score(y[b], pa[b]), score(y[b], pb[b])
        wins += 1.0 if sa > sb else 0.5 if sa == sb else 0.0
    return wins / n_draws


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


# ----------------------------------------------------------------------------- the record

def public_fraction_of(task) -> tuple[float, str]:
    """The task's public fraction and where it came from (``task`` | ``assumed``)."""
    value = getattr(task, "public_fraction", None)
    if value is None:
        return DEFAULT_PUBLIC_FRACTION, "assumed"
    return float(value), "task"


def metric_score(metric, n_classes: int) -> Score:
    """``score(y, pred)`` on class indices for a metric of :data:`kit.metrics.METRICS`."""
    m = get_metric(metric)

    def score(y, pred):
        return float(m.batch(np.asarray(pred)[None], np.asarray(y), n_classes)[0])

    return score


def bootstrap_se(y, pred, metric, n_classes: int, n_boot: int = N_BOOT,
                 seed=BOOT_SEED) -> float:
    """The standard error of the metric over resamples of the rows (what the nested score's
    bootstrap interval measures, as one number)."""
    y, pred = np.asarray(y), np.asarray(pred)
    idx = check_random_state(seed).integers(0, len(y), size=(int(n_boot), len(y)))
    return float(np.std(get_metric(metric).batch(pred[idx], y[idx], n_classes), ddof=1))


def shakeup_record(y, pred_nested, metric, classes: Sequence[str], n_test: int,
                   public_fraction: float | None = None, seed=SEED,
                   n_draws: int = N_DRAWS) -> dict:
    """The manifest's ``shakeup`` entry: how far public and private scores may drift apart.

    Parameters
    ----------
    y, pred_nested : labels of ``classes`` or class indices
        The OOF labels and the blend's nested predictions, row for row.
    metric : str
        The task's metric (a name of :data:`kit.metrics.METRICS`).
    classes : sequence of str
        The task's classes, in order.
    n_test : int
        Test images Kaggle splits into public and private parts.
    public_fraction : float, optional
        The task's public share; None: :data:`DEFAULT_PUBLIC_FRACTION`, marked ``assumed``.

    Returns
    -------
    dict
        :func:`public_private_spread`'s keys, plus ``metric``, ``seed``,
        ``public_fraction_source`` (``task`` | ``assumed``) and ``expected_se`` (the
        bootstrap standard error of the nested score, for :func:`private_estimate`).
    """
    source = "task" if public_fraction is not None else "assumed"
    fraction = DEFAULT_PUBLIC_FRACTION if public_fraction is None else float(public_fraction)
    name = get_metric(metric).name
    y, pred = to_indices(y, classes), to_indices(pred_nested, classes)
    if len(y) != len(pred) or len(y) == 0:
        raise ValueError(f"shakeup_record: {len(y)} labels and {len(pred)} predictions")
    score = metric_score(name, len(classes))
    record = public_private_spread(y, pred, score, int(n_test), fraction, n_draws, seed)
    record.update(metric=name, seed=int(seed), public_fraction_source=source,
                  expected_se=bootstrap_se(y, pred, name, len(classes)))
    return record


# ----------------------------------------------------------------------------- nested OOF rows

def nested_oof_path(csv_path) -> Path:
    """``submissions/<stem>.oof.csv`` beside the submission ``<stem>.csv``."""
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.stem + OOF_SUFFIX)


def write_nested_oof(path, ids, y_labels, pred_labels) -> Path:
    """Write ``sample_index,label,pred`` (the nested OOF prediction of each image) atomically.

    Raises
    ------
    ValueError
        Columns of different lengths, or an image twice (a caller's bug, not user input).
    """
    import pandas as pd

    ids, y, pred = list(map(str, ids)), list(map(str, y_labels)), list(map(str, pred_labels))
    if not len(ids) == len(y) == len(pred):
        raise ValueError(f"write_nested_oof: {len(ids)} ids, {len(y)} labels, {len(pred)} "
                         "predictions")
    if len(set(ids)) != len(ids):
        raise ValueError("write_nested_oof: repeated sample_index")
    return atomic_write_csv(path, pd.DataFrame({"sample_index": ids, "label": y, "pred": pred}))


def read_nested_oof(path, classes: Sequence[str]):
    """A nested OOF file, indexed by ``sample_index``: ``y`` and ``pred`` as class indices.

    Raises
    ------
    KitError
        Missing or unreadable file, missing columns, a repeated image or a label not among
        ``classes``; each names the file and says to re-run the blend.
    """
    path = Path(path)
    fix = "rerun ./run.sh blend to write it again (or delete it)"
    if not path.is_file():
        raise KitError(f"{path}: nested OOF file not found; {fix}")
    df = read_csv_columns(path, OOF_COLUMNS, ",".join(OOF_COLUMNS), fix)
    dup = df.sample_index[df.sample_index.duplicated()]
    if len(dup):
        raise KitError(f"{path}: sample_index {dup.iloc[0]} appears twice; {fix}")
    try:
        df["y"], df["pred"] = to_indices(df.label.to_numpy(), classes), to_indices(
            df.pred.to_numpy(), classes)
    except ValueError as exc:
        raise KitError(f"{path}: {exc} (the task's classes); {fix}") from None
    return df.set_index("sample_index")[["y", "pred"]]
