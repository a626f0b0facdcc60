"""The blend, the submission, reproduce, compare, submit and the report on a task other than
AN2DL: the task's metric is what the weights and class biases are fitted for and every score
is in; the submission has the task's columns, classes and test ids; the manifest records the
task."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from blend_data import make_task_blend_workdir, shifted_problem
from kit.cli import main
from kit.config import load_config
from kit.ensemble.biases import apply_rule, confusion_scores, fit_biases, weighted_metric_batch
from kit.ensemble.search import BlendSearch
from kit.ensemble.weights import greedy_weights
from kit.metrics import METRICS, score
from kit.submission.blend_output import run_blend
from kit.submission.package import load_manifest, validate_submission
from kit.submission.reproduce import run_reproduce
from kit.submission.task_data import manifest_task, train_labels_digest
from kit.utils import KitError


@pytest.fixture(scope="module")
def csv_task(tmp_path_factory):
    """A blended csv-layout task (3 classes, columns case/tissue, balanced accuracy)."""
    paths, root, data = make_task_blend_workdir(tmp_path_factory.mktemp("csv"), "csv")
    result = run_blend(paths, data, load_config("blend"), name="other", seed=3)
    return paths, root, data, result


# ----------------------------------------------------------------------------- on arrays

@pytest.mark.parametrize("metric", list(METRICS))
def test_class_weighted_scores_are_the_metric_on_repeated_rows(metric):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 80)
    preds = rng.integers(0, 4, (12, 80))
    preds[0] = 0                       # one class predicted only
    preds[1] = np.where(y == 3, 2, y)  # a class never predicted
    batch = METRICS[metric].batch
    cm = np.stack([np.bincount(y * 4 + p, minlength=16).reshape(4, 4) for p in preds])
    assert np.allclose(confusion_scores(metric, cm), batch(preds, y, 4))
    weight = np.array([1, 3, 2, 1])
    rows = np.repeat(np.arange(80), weight[y])  # each row counted its class's weight times
    assert np.allclose(weighted_metric_batch(metric, preds, y, weight, 4),
                       batch(preds[:, rows], y[rows], 4))


@pytest.mark.parametrize("metric", list(METRICS))
def test_biases_raise_each_metric_they_are_fitted_for_nested(metric):
    """On a problem built to need them (one frequent class under-predicted), the biases the
    blend fits for the task's metric raise that metric on the held-out folds, and they are
    the biases fitted for that metric, not for macro F1."""
    p = shifted_problem(seed=0)
    cfg = load_config("blend")
    est = BlendSearch("f1", cfg, 0).fit(p["oof"], p["y"], p["folds"], metric=metric)
    nested, in_sample = est.scores_["nested"], est.scores_["in_sample"]
    declined = np.all(est.biases_ == 0) and all(np.all(f.biases == 0)
                                                for f in est.fold_fits_.values())
    assert not declined  # the problem needs them...
    assert nested["score"] > nested["score_no_bias"]  # ...and they pay off, out of sample
    assert in_sample["score"] > in_sample["score_no_bias"]
    y = p["y"]
    assert nested["score"] == pytest.approx(score(metric, y, est.nested_pred_, range(4)))
    assert est.scores_["metric"] == metric and est.metric_ == metric
    blended = np.tensordot(est.weights_, p["oof"], axes=1)
    assert np.array_equal(est.biases_, fit_biases(blended, y, cfg, metric=metric))
    assert est.score(p["oof"], y) == pytest.approx(in_sample["score"])


def test_biases_differ_by_metric_so_the_choice_matters():
    p = shifted_problem(seed=0)
    cfg = load_config("blend")
    probs = p["oof"].mean(axis=0)
    biases = {m: tuple(fit_biases(probs, p["y"], cfg, metric=m)) for m in METRICS}
    assert len(set(biases.values())) >= 3
    # each set of biases beats argmax on its own metric, in sample
    for m, b in biases.items():
        assert score(m, p["y"], apply_rule(probs, np.array(b), cfg["eps"]), range(4)) > \
            score(m, p["y"], probs.argmax(axis=1), range(4))


def test_weight_search_scores_the_task_metric():
    p = shifted_problem(seed=1, n_models=3)
    for objective in ("f1", "metric"):
        weights, got = greedy_weights(p["oof"], p["y"], objective, metric="balanced_accuracy")
        pred = np.tensordot(weights, p["oof"], axes=1).argmax(axis=1)
        assert got == pytest.approx(score("balanced_accuracy", p["y"], pred, range(4)))
    with pytest.raises(KitError, match="unknown metric 'f2'"):
        BlendSearch("f1", load_config("blend"), 0).fit(p["oof"], p["y"], p["folds"],
                                                       metric="f2")


def test_prior_em_fits_the_biases_for_the_mix_in_any_metric():
    p = shifted_problem(seed=2)
    cfg = load_config("blend", {"prior": "em", "em_alpha": 1.0})  # always EM's mix
    est = BlendSearch("f1", cfg, 0).fit(p["oof"], p["y"], p["folds"], metric="quadratic_kappa")
    fits = list(est.fold_fits_.values())
    assert all(f.prior is not None and f.prior.estimate.shifted for f in fits)
    rule = est.prior_rule(p["oof"][:, :200])
    assert rule.mode == "em" and rule.probs.shape == (200, 4) and rule.biases[0] == 0
    assert 0 <= est.scores_["nested"]["score"] <= 1


# ----------------------------------------------------------------------------- the stage

def test_blend_writes_the_tasks_submission_and_manifest(csv_task):
    paths, root, data, res = csv_task
    task = data.task
    sub = pd.read_csv(res.csv_path, dtype=str)
    assert list(sub.columns) == ["case", "tissue"] and set(sub.tissue) <= set(task.classes)
    test_ids = sorted(p.stem for p in (root / "test").glob("*.png"))
    assert list(sub.case) == test_ids
    assert validate_submission(res.csv_path, data, task=task) == []
    assert validate_submission(res.csv_path, root, task=task) == []
    m = load_manifest(res.manifest_path)
    assert m["metric"] == "balanced_accuracy" and m["task"]["name"] == task.name
    assert m["task"]["fingerprint"] == task.fingerprint and manifest_task(m) == task
    assert m["expected_score"]["metric"] == "balanced_accuracy"
    assert m["expected_score"]["score"] == m["scores"]["nested"]["score"]
    lo, hi = m["expected_ci95"]
    assert lo <= m["expected_score"]["score"] <= hi
    assert m["data"]["train_labels_source"] == "train.csv"
    assert set(m["blend"]["biases"]) == set(task.classes)
    assert set(m["scores"]["nested"]["per_class_f1"]) == set(task.classes)
    oof = pd.read_csv(paths.runs_dir / "blend" / "oof_blend.csv")
    assert [c for c in oof.columns if c.startswith("p_")] == task.prob_columns
    # the validator checks against the task: AN2DL's header and classes are refused
    wrong = sub.rename(columns={"case": "sample_index", "tissue": "label"})
    assert validate_submission(wrong, data, task=task)[0] == (
        "header is 'sample_index,label', expected exactly 'case,tissue'")
    sub.loc[0, "tissue"] = "Luminal A"
    assert any("unknown label 'Luminal A'" in line
               for line in validate_submission(sub, data, task=task))


def test_reproduce_and_the_tasks_fingerprint(csv_task, tmp_path):
    paths, root, data, res = csv_task
    report = run_reproduce(None, None, None, manifest=res.manifest_path)
    assert report.identical, report.differences
    m = json.loads(res.manifest_path.read_text())
    m["task"]["fingerprint"] = "0" * 64
    m["task"]["definition"]["metric"] = "accuracy"  # made for another task
    other = tmp_path / res.manifest_path.name
    other.write_text(json.dumps(m))
    (tmp_path / res.csv_path.name).write_bytes(res.csv_path.read_bytes())
    report = run_reproduce(paths, root, None, manifest=other)
    assert any(d.startswith("task: made for synthetic-csv") for d in report.differences)


def test_labels_of_the_folders_layout_are_hashed_as_a_listing(tmp_path):
    paths, root, data = make_task_blend_workdir(tmp_path, "imagefolder")
    res = run_blend(paths, data, load_config("blend"), seed=1)
    m = load_manifest(res.manifest_path)
    assert m["data"]["train_labels_source"] == "sorted id,label listing of train/{label}/{id}.png"
    assert m["data"]["train_labels_sha256"] == train_labels_digest(data, data.task)[0]
    assert list(pd.read_csv(res.csv_path).columns) == ["id", "label"]
    assert run_reproduce(None, None, None, manifest=res.manifest_path).identical
    # a relabelled image (moved to another class folder) changes the digest
    first = next(iter(sorted((root / "train").glob("*/*.png"))))
    target = next(d for d in (root / "train").iterdir() if d != first.parent)
    first.rename(target / first.name)
    report = run_reproduce(None, None, None, manifest=res.manifest_path)
    assert any("sorted id,label listing" in d and "changed" in d for d in report.differences)


def test_runs_of_another_metric_or_classes_are_refused(tmp_path):
    paths, root, data = make_task_blend_workdir(tmp_path, "csv")
    metrics_path = paths.backbone_dir("bb_b") / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics_path.write_text(json.dumps({**metrics, "metric": "macro_f1"}))
    with pytest.raises(KitError, match=r"bb_b/metrics.json: scored by macro_f1, not the "
                                       r"task's balanced_accuracy; rerun ./run.sh cv bb_b"):
        run_blend(paths, data, load_config("blend"))
    metrics_path.write_text(json.dumps({**metrics, "classes": ["a", "b", "c"]}))
    with pytest.raises(KitError, match="made for classes a, b, c, not Normal, Benign, Invasive"):
        run_blend(paths, data, load_config("blend"))
    # a run written before runs named their metric scored macro F1: refused here too, and
    # each backbone that cannot be blended is named
    older = {k: v for k, v in metrics.items() if k not in ("metric", "oof_score", "classes")}
    for bb in ("bb_a", "bb_b"):
        (paths.backbone_dir(bb) / "metrics.json").write_text(json.dumps(older))
    with pytest.raises(KitError, match="2 backbones cannot be blended") as exc:
        run_blend(paths, data, load_config("blend"))
    assert all("scored by macro_f1, not the task's balanced_accuracy" in line
               for line in exc.value.problems)


def test_compare_and_report_name_the_metric(csv_task, capsys):
    paths, root, data, res = csv_task
    args = ["--workdir", str(paths.root), "--data", str(root)]
    assert main(["compare", "bb_a", "bb_b", *args]) == 0
    out = capsys.readouterr().out
    assert "OOF balanced accuracy: A bb_a " in out
    a = pd.read_csv(paths.backbone_dir("bb_a") / "oof.csv")
    want = score("balanced_accuracy", a.label.to_numpy(),
                 a[data.task.prob_columns].to_numpy(), data.task.classes)
    assert f"A bb_a {want:.3f} [" in out
    assert main(["report", *args]) == 0
    html = (paths.runs_dir / "report.html").read_text()
    cv = html.split("<section id='cv'>")[1].split("</section>")[0]
    assert "<h3>Balanced accuracy, out of fold</h3>" in cv
    assert "OOF balanced accuracy [95% interval]" in cv and "F1 Invasive" in cv
    blend = html.split("<section id='blend'>")[1].split("</section>")[0]
    assert "scored in balanced accuracy" in blend and "<td>Invasive</td>" in blend
    data_part = html.split("<section id='data'>")[1].split("</section>")[0]
    assert "<td>Normal</td>" in data_part and "training images" in data_part
    assert "task <code>synthetic-csv</code>, scored by balanced accuracy" in html
    assert "could not be built" not in html


def test_submit_takes_the_slug_from_the_task_or_refuses(csv_task, tmp_path, monkeypatch,
                                                        capsys):
    paths, root, data, res = csv_task
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef")
    args = ["submit", "-m", "x", "--dry-run", "--workdir", str(paths.root), "--data", str(root)]
    assert main(args) == 2  # the task names no competition, nor does submit.yaml
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Kaggle competition to submit to for task synthetic-csv" in err[0]
    assert "pass -c SLUG" in err[0] and f"kaggle: in {root / 'task.yaml'}" in err[0]
    assert main(args + ["-c", "my-comp"]) == 0
    out = capsys.readouterr().out
    assert "12 rows valid" in out and "would upload to my-comp" in out
    task_yaml = (root / "task.yaml").read_text()
    try:
        (root / "task.yaml").write_text(task_yaml.replace("kaggle: null", "kaggle: from-task"))
        assert main(args) == 2  # the manifest was made for the task before the edit
        assert "made for task synthetic-csv" in capsys.readouterr().err
        own = tmp_path / "mine.csv"  # a CSV without a manifest: the task's slug
        own.write_bytes(res.csv_path.read_bytes())
        assert main(args[:1] + [str(own)] + args[1:]) == 0
        assert "would upload to from-task" in capsys.readouterr().out
    finally:
        (root / "task.yaml").write_text(task_yaml)
