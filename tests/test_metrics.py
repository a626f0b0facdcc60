import numpy as np
import pytest
from sklearn.metrics import f1_score

from kit import CLASSES
from kit.metrics import (aggregate, classification_summary, macro_f1, plot_confusion,
                         to_indices, weighted_f1)


def test_aggregate_mean_prob_is_the_patch_mean_per_image():
    p = np.array([[[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]],
                  [[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 1.0]]])
    out = aggregate(p, "mean_prob")
    np.testing.assert_allclose(out, [[0.4, 0.4, 0.1, 0.1], [0.125, 0.125, 0.125, 0.625]])


def test_aggregate_accepts_flat_rows_in_image_major_order():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=(5, 3))
    np.testing.assert_allclose(aggregate(p.reshape(15, 4), k=3), aggregate(p))
    with pytest.raises(ValueError):
        aggregate(p.reshape(15, 4))  # k missing
    with pytest.raises(ValueError):
        aggregate(p.reshape(15, 4), k=4)  # does not divide


def test_aggregate_mean_logprob_is_normalised_geometric_mean():
    p = np.array([[[0.5, 0.3, 0.1, 0.1], [0.2, 0.6, 0.1, 0.1]]])
    geo = np.sqrt(p[0, 0] * p[0, 1])
    np.testing.assert_allclose(aggregate(p, "mean_logprob")[0], geo / geo.sum())
    # one confident patch that rules a class out vetoes it, unlike the arithmetic mean
    q = np.array([[[0.0, 1.0, 0.0, 0.0], [0.9, 0.1, 0.0, 0.0]]])
    assert aggregate(q, "mean_prob")[0, 0] == pytest.approx(0.45)
    assert aggregate(q, "mean_logprob")[0, 0] < 1e-3
    np.testing.assert_allclose(aggregate(q, "mean_logprob").sum(axis=1), 1.0)
    with pytest.raises(ValueError):
        aggregate(q, "median")


def test_macro_f1_matches_sklearn_and_accepts_strings_and_probabilities():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 50)
    probs = rng.dirichlet(np.ones(4), size=50)
    expected = f1_score(y, probs.argmax(1), average="macro")
    assert macro_f1(y, probs) == pytest.approx(expected)
    names = np.array(CLASSES)[y]
    assert macro_f1(names, probs) == pytest.approx(expected)
    assert macro_f1(names, np.array(CLASSES)[probs.argmax(1)]) == pytest.approx(expected)
    assert weighted_f1(y, probs) == pytest.approx(f1_score(y, probs.argmax(1), average="weighted"))
    assert macro_f1(y, y) == 1.0
    with pytest.raises(ValueError, match="unknown label"):
        to_indices(["Luminal C"])


def test_macro_f1_weights_classes_equally():
    # 9 of class 0 right, the single class-1 image wrong: accuracy 0.9, macro F1 far lower
    y = np.array([0] * 9 + [1])
    pred = np.zeros(10, dtype=int)
    assert macro_f1(y, pred) == pytest.approx((2 * 9 / 19 + 0) / 2)
    assert weighted_f1(y, pred) > macro_f1(y, pred)


def test_classification_summary_counts(tmp_path):
    y = np.array([0, 0, 1, 2, 3, 3])
    probs = np.eye(4)[[0, 1, 1, 2, 3, 0]]
    s = classification_summary(y, probs)
    assert s["confusion"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]]
    assert s["per_class"]["Luminal A"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert s["per_class"]["Luminal B"]["precision"] == 0.5
    assert s["per_class"]["Luminal B"]["recall"] == 1.0
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["macro_f1"] == pytest.approx(macro_f1(y, probs))
    path = tmp_path / "out" / "confusion.png"
    plot_confusion(s["confusion"], CLASSES, path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["confusion.png"]  # no temp file left


def test_collapse_reason_flags_one_class_and_majority_level_models():
    from kit.metrics import collapse_reason

    y = np.array([0] * 10 + [1] * 5 + [2] * 3 + [3] * 2)
    assert f"predicts {CLASSES[0]} for 100%" in collapse_reason(y, np.zeros(20, int))
    assert collapse_reason(y, y) is None  # perfect
    # 85 % one class, the rest wrong: below the share rule, but no better than the majority.
    pred = np.array([1] * 17 + [0] * 3)
    reason = collapse_reason(y, pred)
    assert reason is not None and "no better than" in reason
    probs = np.eye(4)[y]
    assert collapse_reason(y, probs) is None  # probabilities are argmaxed


# --------------------------------------------------------------------------- intervals
def _noisy(n, accuracy, seed):
    """Labels of ``n`` images and predictions right on about ``accuracy`` of them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    wrong = rng.random(n) > accuracy
    pred = np.where(wrong, (y + rng.integers(1, 4, n)) % 4, y)
    return y, pred


def test_bootstrap_ci_contains_the_score_and_narrows_with_more_images():
    from kit.metrics import bootstrap_ci

    widths = []
    for n in (60, 600, 6000):
        y, pred = _noisy(n, 0.6, seed=n)
        lo, hi = bootstrap_ci(y, pred, n_boot=400)
        assert lo < macro_f1(y, pred) < hi
        widths.append(hi - lo)
    # the width of a percentile interval shrinks as 1/sqrt(n): ~3.2x per 10x images
    assert widths[0] > 2 * widths[1] > 4 * widths[2]


def test_bootstrap_ci_is_deterministic_for_a_seed_and_accepts_labels_and_probabilities():
    from kit.metrics import bootstrap_ci

    y, pred = _noisy(200, 0.5, seed=1)
    a = bootstrap_ci(y, pred, n_boot=300, seed=7)
    assert bootstrap_ci(y, pred, n_boot=300, seed=7) == a
    assert bootstrap_ci(y, pred, n_boot=300, seed=8) != a
    names, probs = np.array(CLASSES)[y], np.eye(4)[pred]
    assert bootstrap_ci(names, probs, n_boot=300, seed=7) == a
    # a wider level gives a wider interval around the same resamples
    lo90, hi90 = bootstrap_ci(y, pred, n_boot=300, seed=7, level=0.9)
    assert a[0] <= lo90 and hi90 <= a[1]
    assert all(np.isnan(bootstrap_ci([], [])))
    with pytest.raises(ValueError, match="200 labels"):
        bootstrap_ci(y, pred[:-1])


def test_paired_bootstrap_of_identical_predictions_is_zero_and_a_coin_toss():
    from kit.metrics import paired_bootstrap

    y, pred = _noisy(150, 0.5, seed=2)
    r = paired_bootstrap(y, pred, pred.copy(), n_boot=200, seed=0)
    assert r["diff"] == 0 and r["ci95"] == [0.0, 0.0] and r["p_b_better"] == 0.5
    assert r["a"] == r["b"] == pytest.approx(macro_f1(y, pred))
    assert r["n"] == 150 and r["n_boot"] == 200
    assert paired_bootstrap(y, pred, pred, n_boot=200, seed=0) == r  # deterministic


def test_paired_bootstrap_finds_a_clearly_better_b_and_its_ci_holds_the_difference():
    from kit.metrics import paired_bootstrap

    y, worse = _noisy(400, 0.45, seed=3)
    better = np.where(np.random.default_rng(4).random(400) < 0.5, y, worse)  # fixes half
    r = paired_bootstrap(y, worse, better, n_boot=500, seed=1)
    assert r["diff"] == pytest.approx(macro_f1(y, better) - macro_f1(y, worse))
    assert r["diff"] > 0.1 and 0 < r["ci95"][0] < r["diff"] < r["ci95"][1]
    assert r["p_b_better"] > 0.99
    swapped = paired_bootstrap(y, better, worse, n_boot=500, seed=1)
    assert swapped["p_b_better"] < 0.01
    assert swapped["ci95"] == pytest.approx([-r["ci95"][1], -r["ci95"][0]])


def test_paired_bootstrap_refuses_predictions_of_other_images():
    from kit.metrics import paired_bootstrap

    y, pred = _noisy(50, 0.5, seed=5)
    with pytest.raises(ValueError, match="50 labels, 50 and 49 predictions"):
        paired_bootstrap(y, pred, pred[:-1])
    with pytest.raises(ValueError, match="no images"):
        paired_bootstrap([], [], [])


def test_format_ci():
    from kit.metrics import format_ci

    assert format_ci(0.4987, (0.4612, 0.5391)) == "0.499 [0.46, 0.54]"
    assert format_ci(0.4987, None) == "0.499"
    assert format_ci(0.4987, (float("nan"), float("nan"))) == "0.499"
