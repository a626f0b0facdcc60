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
