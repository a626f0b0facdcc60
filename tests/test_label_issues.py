"""Label issues: confident learning on inner out-of-fold probabilities of one fold's rows."""
import numpy as np
import pandas as pd
import pytest

from kit import CLASSES
from kit.config import train_settings
from kit.models.heads import create_head
from kit.training import label_issues as li
from kit.training.feature_cv import train_bag
from kit.training.settings import train_config
from kit.training.sources import FeatureSource


def _noisy(n=120, d=16, flip=0.2, seed=0):
    """Separable embeddings (n x K=3 x V=1 x d) whose labels are flipped for a share of images."""
    rng = np.random.default_rng(seed)
    true = np.arange(n) % 4
    means = rng.normal(0, 3, (4, d))
    x = (means[true][:, None, None, :] + rng.normal(0, 1.0, (n, 3, 1, d))).astype(np.float32)
    y = true.copy()
    flipped = rng.choice(n, int(flip * n), replace=False)
    y[flipped] = (true[flipped] + rng.integers(1, 4, len(flipped))) % 4
    return x, y, np.isin(np.arange(n), flipped)


def _frame(y, rows=None):
    rows = np.arange(len(y)) if rows is None else rows
    return pd.DataFrame({"sample_index": [f"img_{r:04d}" for r in rows], "row": rows, "y": y,
                         "label": [CLASSES[i] for i in y]})


def _cfg(**params):
    return train_config(train_settings(), params={"epochs": 8, "lr": 0.01, "batch_size": 64,
                                                  **params})


def test_confident_learning_flags_labels_the_probabilities_contradict():
    rng = np.random.default_rng(0)
    y = np.arange(80) % 4
    probs = np.full((80, 4), 0.02)
    probs[np.arange(80), y] = 0.94
    wrong = rng.choice(80, 10, replace=False)
    given = y.copy()
    given[wrong] = (y[wrong] + 1) % 4
    flagged, quality = li.confident_learning(given, probs)
    assert set(np.flatnonzero(flagged)) == set(wrong)
    assert quality[wrong].max() < quality[~np.isin(np.arange(80), wrong)].min()


def test_a_class_absent_from_the_labels_is_left_out_for_cleanlab():
    y = np.arange(30) % 3  # class 3 never given
    probs = np.full((30, 4), 0.05)
    probs[np.arange(30), y] = 0.85
    flagged, quality = li.confident_learning(y, probs)
    assert not flagged.any() and quality.shape == (30,)


@pytest.mark.parametrize("model", ["head", "logreg"])
def test_inner_cv_finds_planted_label_errors(model):
    x, y, noisy = _noisy()
    cfg = _cfg(**{"label_issues.model": model, "label_issues.mode": "drop"})
    src = FeatureSource(x, cfg)
    issues = li.find_fold_issues(src, _frame(y), cfg, seed=0, fold=0)
    precision = noisy[issues.flagged].mean()
    recall = issues.flagged[noisy].mean()
    assert precision >= 0.8 and recall >= 0.6, (precision, recall)
    assert issues.quality[noisy].mean() < issues.quality[~noisy].mean()


def test_the_inner_cv_reads_only_the_rows_it_is_given():
    x, y, _ = _noisy()
    cfg = _cfg(**{"label_issues.mode": "drop"})
    src = FeatureSource(x, cfg)
    rows = np.arange(0, 120, 2)
    a = li.inner_oof_probs(src, rows, y[rows], None, cfg, seed=1)
    x2 = x.copy()
    x2[1::2] = np.random.default_rng(5).normal(0, 9, x2[1::2].shape)  # other rows: garbage
    b = li.inner_oof_probs(FeatureSource(x2, cfg), rows, y[rows], None, cfg, seed=1)
    np.testing.assert_array_equal(a, b)


def test_training_weights_per_mode():
    issues = li.FoldIssues(0, np.array(["a", "b", "c", "d"]), np.array([0, 0, 1, 1]),
                           np.full((4, 4), 0.25), np.array([True, False, True, True]),
                           np.array([0.01, 0.9, 0.2, 0.3]))
    cfg = _cfg()
    assert li.training_weights(issues, cfg) == (None, None)
    cfg["label_issues"]["mode"] = "drop"
    keep, w = li.training_weights(issues, cfg)
    # every image of class 1 is flagged: the class stays rather than vanish from training
    assert keep.tolist() == [False, True, True, True] and w is None
    cfg["label_issues"]["mode"] = "weight"
    keep, w = li.training_weights(issues, cfg)
    assert keep.all() and np.allclose(w, [0.05, 0.9, 0.2, 0.3])


def test_summary_lists_each_image_once_with_the_folds_that_flagged_it():
    def fold(k, ids, flagged, p0):
        probs = np.tile([p0, 1 - p0, 0, 0], (len(ids), 1))
        return li.FoldIssues(k, np.array(ids), np.zeros(len(ids), int), probs,
                             np.array(flagged), np.array([p0] * len(ids))).frame()

    table = li.summarise([fold(0, ["a", "b"], [True, False], 0.2),
                          fold(1, ["a", "c"], [True, False], 0.4),
                          fold(2, ["b", "c"], [False, False], 0.9)])
    assert table.sample_index.tolist() == ["a", "b", "c"]  # lowest quality first
    a = table.iloc[0]
    assert a.flagged_by == "0;1" and a.n_folds == 2 and a.suggested_label == CLASSES[1]
    assert a.label == CLASSES[0] and np.isclose(a.quality, 0.3)
    assert table.iloc[2].flagged_by == "" and table.iloc[2].flagged == 0


def test_bag_of_one_is_the_plain_head_and_more_members_average():
    x, y, _ = _noisy(n=60, flip=0.0)
    cfg = _cfg()
    src = FeatureSource(x, cfg)
    tr = _frame(y[:48])
    predict = lambda head, xx: src.image_probs(head, xx, ("id",))  # noqa: E731

    def bag():
        return train_bag(src, lambda: create_head(16, 4, **cfg["head"]), tr, cfg, 7, "cpu",
                         lambda head: predict(head, np.arange(48, 60)))

    one, p1, _ = bag()
    again, p1b, _ = bag()
    np.testing.assert_array_equal(p1["id"], p1b["id"])
    cfg["bag"] = 3
    three, p3, _ = bag()
    assert len(three) == 3
    np.testing.assert_array_equal(predict(three[0].model, np.arange(48, 60))["id"], p1["id"])
    mean = np.mean([predict(m.model, np.arange(48, 60))["id"] for m in three], axis=0)
    np.testing.assert_allclose(p3["id"], mean, atol=1e-7)
    assert not np.allclose(predict(three[1].model, np.arange(48, 60))["id"], p1["id"])


def test_another_tasks_inner_cv_keeps_patients_whole_and_writes_its_classes(monkeypatch):
    from kit.task import load_task

    task = load_task("imagefolder")  # three classes, balanced accuracy
    x, y, _ = _noisy(n=60)
    y = y % 3
    frame = pd.DataFrame({"sample_index": [f"x_{r:03d}" for r in range(60)],
                          "row": np.arange(60), "y": y,
                          "label": [task.classes[i] for i in y],
                          "group": [f"P{r // 3:02d}" for r in range(60)]})  # 3 a patient
    calls, real = [], li.grouped_splits

    def spy(y, groups=None, *a, **kw):
        splits = real(y, groups, *a, **kw)
        calls.append((np.asarray(groups), splits))
        return splits

    monkeypatch.setattr(li, "grouped_splits", spy)
    cfg = _cfg(**{"label_issues.mode": "drop", "label_issues.inner_folds": 3})
    issues = li.find_fold_issues(FeatureSource(x, cfg), frame, cfg, seed=0, fold=2, task=task)
    assert len(calls) == 1
    groups, splits = calls[0]
    assert list(groups) == frame.group.tolist() and len(splits) == 3
    for fit, held in splits:
        assert set(groups[fit]).isdisjoint(groups[held])
    assert issues.probs.shape == (60, 3) and issues.classes == task.classes
    table = issues.frame()
    assert [c for c in table.columns if c.startswith("p_")] == task.prob_columns
    assert set(table.label) == set(task.classes)
    summary = li.summarise([table], task.classes)
    assert set(summary.suggested_label) <= set(task.classes)
