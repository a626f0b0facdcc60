import numpy as np
import pytest
from sklearn.metrics import f1_score

from kit import CLASSES
from kit.metrics import (
    aggregate,
    classification_summary,
    macro_f1,
    plot_confusion,
    to_indices,
    weighted_f1,
)


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


# --------------------------------------------------------------------------- the registry
def _sklearn(name, y, pred, n_classes):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score

    if name == "macro_f1":
        return f1_score(y, pred, average="macro", zero_division=0)
    if name == "weighted_f1":
        return f1_score(y, pred, average="weighted", zero_division=0)
    if name == "accuracy":
        return accuracy_score(y, pred)
    if name == "balanced_accuracy":
        return balanced_accuracy_score(y, pred)
    # the task's class order sets the distances, whichever classes occur
    return cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(n_classes)),
                             replace_undefined_by=0.0)


def _cases():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 5, 80)
    noisy = np.where(rng.random(80) < 0.6, y, rng.integers(0, 5, 80))
    no_class_3 = np.where(noisy == 3, 2, noisy)  # a class the predictions never name
    ordinal = np.clip(y + rng.integers(-1, 2, 80), 0, 4)  # off by one grade at most
    no_truth_4 = np.where(y == 4, 0, y)  # a class absent from the truth, present in predictions
    return {"noisy": (y, noisy), "absent_from_predictions": (y, no_class_3),
            "ordinal": (y, ordinal), "absent_from_truth": (no_truth_4, noisy),
            "perfect": (y, y.copy()), "one_class_each": (np.zeros(9, int), np.zeros(9, int))}


@pytest.mark.filterwarnings("ignore::UserWarning")  # sklearn: y_pred has classes not in y_true
@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("name", ["macro_f1", "balanced_accuracy", "accuracy", "weighted_f1",
                                  "quadratic_kappa"])
def test_each_metric_matches_scikit_learn(name, case):
    from kit.metrics import METRICS

    y, pred = _cases()[case]
    classes = [f"grade {i}" for i in range(5)]
    expected = _sklearn(name, y, pred, 5)
    metric = METRICS[name]
    assert metric(y, pred, classes) == pytest.approx(expected, abs=1e-12)
    # labels of the task's classes, and probabilities, give the same score
    names = np.array(classes)
    assert metric(names[y], names[pred], classes) == pytest.approx(expected, abs=1e-12)
    assert metric(y, np.eye(5)[pred], classes) == pytest.approx(expected, abs=1e-12)
    # the vectorised form scores each row alike, against one truth or one per row
    batch = metric.batch(np.stack([pred, y]), y, 5)
    assert batch == pytest.approx([expected, _sklearn(name, y, y, 5)], abs=1e-12)
    assert metric.batch(np.stack([pred, pred]), np.stack([y, y]), 5) == pytest.approx(
        [expected] * 2, abs=1e-12)


def test_quadratic_kappa_uses_the_class_order_even_for_absent_classes():
    from kit.metrics import METRICS

    kappa = METRICS["quadratic_kappa"]
    y = np.array([0, 0, 2, 2, 2, 0])
    near, far = np.array([0, 0, 2, 2, 1, 0]), np.array([0, 0, 2, 2, 0, 0])
    # one grade off costs less than two grades off, class 1 in the truth or not
    assert kappa(y, near, ["a", "b", "c"]) > kappa(y, far, ["a", "b", "c"])
    assert kappa(y, far, ["a", "b", "c"]) == pytest.approx(_sklearn("quadratic_kappa", y, far, 3))


def test_metric_registry_names_and_errors():
    from kit.metrics import METRICS, get_metric, score
    from kit.utils import KitError

    assert list(METRICS) == ["macro_f1", "balanced_accuracy", "accuracy", "weighted_f1",
                             "quadratic_kappa"]
    y, pred = _noisy(60, 0.6, seed=9)
    assert score("macro_f1", y, pred) == macro_f1(y, pred)  # today's function, unchanged
    assert get_metric("accuracy").title == "accuracy"
    with pytest.raises(KitError, match="unknown metric 'f1'; use one of macro_f1, "):
        get_metric("f1")
    with pytest.raises(ValueError, match="class index 4 outside 0..3"):
        score("accuracy", [0, 1], [4, 1])
    with pytest.raises(ValueError, match="2 labels but 1 predictions"):
        score("accuracy", [0, 1], [1])


def test_macro_f1_interval_is_unchanged_by_the_registry():
    """The numbers today's macro-F1 interval gave (same seed, same resamples)."""
    from kit.metrics import bootstrap_ci, paired_bootstrap

    y = np.array([0, 1, 2, 3, 1, 2, 0, 0, 3, 2] * 5)
    p = np.array([0, 1, 1, 3, 1, 2, 0, 2, 3, 0] * 5)
    expected = (0.6050372138070641, 0.8151638575954937)
    assert bootstrap_ci(y, p, n_boot=300, seed=3) == expected
    assert bootstrap_ci(y, p, n_boot=300, seed=3, metric="macro_f1") == expected
    r = paired_bootstrap(y, p, y, n_boot=300, seed=3)
    assert r["ci95"] == [0.18483614240450624, 0.39496278619293584]
    assert r["a"] == 0.7166666666666667 and r["diff"] == 0.2833333333333333


@pytest.mark.parametrize("name", ["balanced_accuracy", "accuracy", "weighted_f1",
                                  "quadratic_kappa"])
def test_bootstrap_of_any_metric_resamples_images(name):
    from kit.metrics import METRICS, _boot_indices, bootstrap_ci, paired_bootstrap

    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 150)
    pred = np.where(rng.random(150) < 0.7, y, rng.integers(0, 3, 150))
    classes = ["low", "mid", "high"]
    lo, hi = bootstrap_ci(y, pred, n_boot=400, seed=2, metric=name, classes=classes)
    # each resample scored as the metric scores those rows
    idx = _boot_indices(150, 400, 2)
    scores = [_sklearn(name, y[i], pred[i], 3) for i in idx]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(scores, [0.025, 0.975])), abs=1e-12)
    assert lo < METRICS[name](y, pred, classes) < hi
    names = np.array(classes)
    assert bootstrap_ci(names[y], names[pred], n_boot=400, seed=2, metric=name,
                        classes=classes) == (lo, hi)
    r = paired_bootstrap(y, pred, y, n_boot=400, seed=2, metric=name, classes=classes)
    assert r["b"] == pytest.approx(1.0) and r["diff"] == pytest.approx(1 - r["a"])
    assert r["a"] == pytest.approx(METRICS[name](y, pred, classes))


def test_collapse_reason_speaks_the_tasks_metric_and_classes():
    from kit.metrics import collapse_reason

    classes = ["low", "high", "mid"]
    y = np.array([0] * 6 + [1] * 3 + [2] * 3)
    assert (collapse_reason(y, np.ones(12, int), classes=classes)
            == "predicts high for 100% of its images")
    pred = np.array([0] * 6 + [2] * 3 + [0] * 3)  # no better than the majority class
    reason = collapse_reason(y, pred, classes=classes, metric="balanced_accuracy")
    assert reason == ("balanced accuracy 0.333 is no better than always predicting the most "
                      "frequent class (0.333)")


def test_prob_frame_takes_a_tasks_classes():
    from kit.metrics import prob_frame

    df = prob_frame(["a", "b"], np.array([[0.2, 0.8], [0.6, 0.4]]), classes=["x", "y"],
                    fold=[0, 1])
    assert list(df.columns) == ["sample_index", "fold", "p_x", "p_y"]
    assert list(prob_frame(["a"], np.eye(4)[[1]]).columns)[1:] == [f"p_{c}" for c in CLASSES]


def test_the_module_is_light():
    """The task model imports it: no scikit-learn or pandas at import time."""
    import subprocess
    import sys

    code = ("import sys, kit.metrics; "
            "print(sorted(m for m in ('sklearn', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
