"""The public/private shake-up, estimated from a submission's nested out-of-fold rows.

Kaggle scores a random part of the test set (the public fraction) during the competition and
ranks by the rest. Both parts are small samples of images, so the public score of a
submission moves away from its private score by chance alone. The nested OOF rows of a blend
are predictions on images whose labels the kit holds, made without those images having
chosen anything: drawn in test-set-sized sets and split like Kaggle splits the test set, they
show how far public and private scores drift apart, and how far one submission's private
score may fall from another's.

Every function takes ``score(y, pred) -> float`` (the task's metric on class indices) and a
seed; the same inputs give the same numbers.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from kit.utils import check_random_state

Score = Callable[[np.ndarray, np.ndarray], float]
N_DRAWS = 2000
SEED = 0


def _sizes(n_test: int, public_fraction: float) -> tuple[int, int]:
    if not 0 < public_fraction < 1:
        raise ValueError(f"public_fraction must be in (0, 1) (got {public_fraction})")
    n_public = int(round(n_test * public_fraction))
    if n_public < 1 or n_public >= n_test:
        raise ValueError(f"{n_test} test images with a public fraction of {public_fraction} "
                         "leave a part empty")
    return n_public, n_test - n_public


def _test_sets(n_rows: int, n_test: int, n_draws: int, rng) -> np.ndarray:
    """``n_draws x n_test`` row indices: test sets drawn from the OOF rows (without
    replacement when there are enough rows, as a test set holds each image once)."""
    if n_rows >= n_test:
        return np.stack([rng.permutation(n_rows)[:n_test] for _ in range(n_draws)])
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


def private_estimate(expected: float, expected_se: float, public: float, spread: dict,
                     level: float = 0.95) -> dict:
    """The private score expected from the nested score and a public score together.

    Both estimate the submission's true score: the nested score with its bootstrap standard
    error, the public score with the spread of a public part (``spread["sd_public"]``). Each
    is weighted by its precision; the private part adds its own sampling spread to the
    interval.

    Returns
    -------
    dict
        ``estimate``, ``ci`` ([lo, hi]), ``weight_public`` (the public score's share).
    """
    var_e, var_p = max(expected_se, 1e-9) ** 2, max(spread["sd_public"], 1e-9) ** 2
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
