"""kit.submission.shakeup: the public/private spread from OOF rows against the spread of the
held-back test labels themselves, the private estimate, and the paired P(A beats B)."""
from __future__ import annotations

import numpy as np
import pytest

from kit.metrics import fast_macro_f1
from kit.submission.shakeup import (p_beats, private_estimate, public_private_spread,
                                    split_spread)


def _classifier(n, accuracy, seed, weights=(0.35, 0.3, 0.25, 0.1)):
    rng = np.random.default_rng(seed)
    y = rng.choice(4, size=n, p=weights)
    wrong = rng.random(n) > accuracy
    pred = np.where(wrong, rng.integers(0, 4, size=n), y)
    return y, pred


def _f1(y, p):
    return fast_macro_f1(y, p, 4)


@pytest.mark.parametrize("accuracy", [0.45, 0.8])
def test_oof_spread_matches_the_held_back_test_labels(accuracy):
    # The v2 shape: 581 OOF rows, 477 test images; the public part is 30 % of them.
    y_oof, p_oof = _classifier(581, accuracy, seed=1)
    y_test, p_test = _classifier(477, accuracy, seed=2)
    est = public_private_spread(y_oof, p_oof, _f1, n_test=477, public_fraction=0.3, n_draws=800)
    seen = split_spread(y_test, p_test, _f1, public_fraction=0.3, n_draws=800)
    assert 0.7 * seen <= est["sd_public_minus_private"] <= 1.3 * seen
    assert est["sd_public"] > est["sd_private"]  # the public part is the smaller sample


def test_spread_is_deterministic_and_shrinks_with_more_test_images():
    y, p = _classifier(600, 0.6, seed=3)
    a = public_private_spread(y, p, _f1, 477, 0.3, n_draws=300, seed=5)
    assert a == public_private_spread(y, p, _f1, 477, 0.3, n_draws=300, seed=5)
    small = public_private_spread(y, p, _f1, 120, 0.3, n_draws=300, seed=5)
    assert small["sd_public_minus_private"] > a["sd_public_minus_private"]


def test_private_estimate_weights_each_score_by_its_precision():
    spread = {"sd_public": 0.04, "sd_private": 0.025}
    sure = private_estimate(0.50, 0.005, public=0.60, spread=spread)
    assert 0.50 < sure["estimate"] < 0.52 and sure["weight_public"] < 0.1
    loose = private_estimate(0.50, 0.2, public=0.60, spread=spread)
    assert loose["estimate"] > 0.59
    lo, hi = sure["ci"]
    assert lo < sure["estimate"] < hi and hi - lo > 2 * 1.9 * 0.025


def test_p_beats_is_paired_and_symmetric():
    y, better = _classifier(581, 0.7, seed=4)
    worse = better.copy()
    flip = np.random.default_rng(0).random(len(y)) < 0.15
    worse[flip] = (worse[flip] + 1) % 4
    p = p_beats(y, better, worse, _f1, 477, 0.3, n_draws=300)
    assert p > 0.95
    assert p_beats(y, worse, better, _f1, 477, 0.3, n_draws=300) == pytest.approx(1 - p)
    assert p_beats(y, better, better, _f1, 477, 0.3, n_draws=50) == 0.5


def test_bad_fraction_is_refused():
    y, p = _classifier(50, 0.6, seed=0)
    with pytest.raises(ValueError, match="public_fraction must be in"):
        public_private_spread(y, p, _f1, 40, 1.0)
    with pytest.raises(ValueError, match="leave a part empty"):
        public_private_spread(y, p, _f1, 2, 0.1)
