"""Any competition: on generated data in other layouts (``kit.data.task_synth``), every stage
runs through ``kit.cli.main`` with no extra flag: the ``task.yaml`` at the data root says the
classes, the layout, the metric and the patient groups.

``csv``: no masks, three classes of other names, labels in ``train.csv`` with the columns
``case,tissue,patient_id``, scored by balanced accuracy; ``csv_masks``: the same with a mask
per image found through ``id_pattern``.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from kit.cli import main
from kit.data.task_synth import CSV_CLASSES, write_task_dataset
from kit.paths import Paths
from kit.task import load_task

LAYOUTS = ("csv", "csv_masks")
N_TRAIN, N_TEST = 24, 6
PATCHES = ["--size", "32", "--stride", "16", "--top-k", "4"]


def _run(*argv) -> str:
    """``./run.sh <argv>``: its stdout; a non-zero exit fails the test with that output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    assert code == 0, f"{' '.join(argv)} exited {code}:\n{out.getvalue()}"
    return out.getvalue()


@pytest.fixture(scope="module", params=LAYOUTS)
def staged(request, tmp_path_factory):
    """A dataset in the layout, and validate, clean, patches and folds run on it."""
    base = tmp_path_factory.mktemp(request.param)
    # Patients of 2-4 images: a split that ignored them would put one in two folds.
    data = write_task_dataset(base / "data", request.param, seed=5, n_train=N_TRAIN,
                              n_test=N_TEST, per_patient=(2, 4))
    common = ["--data", str(data), "--workdir", str(base / "work")]
    printed = {"validate": _run("validate", *common), "clean": _run("clean", *common),
               "patches": _run("patches", *common, *PATCHES),
               "folds": _run("folds", *common, "--n-splits", "3")}
    return request.param, data, Paths.from_root(base / "work"), common, printed


def test_validate_finds_the_task_at_the_data_root(staged):
    layout, data, _, _, printed = staged
    out = printed["validate"]
    assert f"{N_TRAIN} training" in out and f"{N_TEST} test" in out
    assert f"({data / 'task.yaml'}): 3 classes, metric balanced_accuracy" in out
    assert ("masks" if layout == "csv_masks" else "no masks") in out.split("metric")[1]
    assert "patient_id groups" in out


def test_clean_flags_nothing_but_writes_its_files(staged):
    layout, _, paths, _, printed = staged
    assert "no junk detector" in printed["clean"]  # the task's junk: []
    assert paths.outliers_csv.read_text() == "sample_index,reason,score\n"
    assert (paths.clean_dir / "review.html").stat().st_size > 1000
    scores = pd.read_csv(paths.clean_dir / "scores.csv", keep_default_na=False)
    assert len(scores) == N_TRAIN + N_TEST and set(scores.reason) == {""}
    if layout == "csv":  # no mask, no mask hash
        assert set(scores.mask_sha256) == {""} and set(scores.mask_phash) == {""}
    else:
        assert scores.mask_sha256.str.fullmatch("[0-9a-f]{64}").all()


def test_patches_exist_for_every_image(staged):
    from kit.data.patches import load_patches

    layout, data, paths, _, _ = staged
    task = load_task(None, data)
    train_ids = pd.read_csv(data / "train.csv", dtype=str).case
    for split, ids in (("train", sorted(train_ids)),
                       ("test", [f"case_{i:04d}" for i in range(N_TRAIN, N_TRAIN + N_TEST)])):
        ps = load_patches(paths, split)
        assert ps.samples.sample_index.tolist() == ids
        assert ps.array.shape == (len(ids), 4, 32, 32, 3)
        if split == "train":
            assert set(ps.samples.label) <= set(task.classes)
        # no masks: every image's windows are its most tissued ones (the tissue fallback)
        assert ps.samples.fallback.all() == (layout == "csv")
        assert (ps.index.coverage > 0).all()


def test_folds_keep_each_patient_in_one_fold_and_one_inner_group(staged):
    _, data, paths, _, printed = staged
    labels = pd.read_csv(data / "train.csv", dtype=str).set_index("case")
    folds = pd.read_csv(paths.folds_csv, dtype=str, keep_default_na=False)
    assert list(folds.columns) == ["sample_index", "label", "fold", "group"]
    assert sorted(folds.sample_index) == sorted(labels.index)
    assert (folds.label.values == labels.tissue.loc[folds.sample_index].values).all()
    folds["patient"] = labels.patient_id.loc[folds.sample_index].values
    per_patient = folds.groupby("patient")
    assert (per_patient.fold.nunique() == 1).all()  # one patient, one fold
    # the group column, what every fold's inner splits keep together, carries the patient
    assert (per_patient.group.nunique() == 1).all()
    assert folds.patient.nunique() < len(folds)  # some patients really have several images
    assert set(folds.label) == set(CSV_CLASSES)
    header = next(line for line in printed["folds"].splitlines() if line.startswith("fold"))
    assert header.split()[1:4] == list(CSV_CLASSES)  # the task's classes, in its order
    config = yaml.safe_load((paths.runs_dir / "folds" / "config.yaml").read_text())
    assert "labels_group" in config["grouping"]["sources"]
    assert config["grouping"]["labels_group"]["column"] == "patient_id"
    assert config["task"] == load_task(None, data).name


def test_cv_blend_and_report_write_the_tasks_submission_and_metric(staged):
    _, data, paths, common, _ = staged
    # tiny_cnn from random weights, frozen: heads train on cached embeddings (seconds)
    _run("cv", "tiny_cnn", *common, "--weights", "random", "--params", "none", "--epochs", "2",
         "--train-norm", "none", "--unfreeze-last", "0")
    _run("blend", *common)
    _run("report", *common)
    task = load_task(None, data)
    sub = pd.read_csv(paths.submissions_dir / "latest.csv", dtype=str, keep_default_na=False)
    assert list(sub.columns) == list(task.submission_columns) == ["case", "tissue"]
    tests = [f"case_{i:04d}" for i in range(N_TRAIN, N_TRAIN + N_TEST)]
    assert sorted(sub.case) == tests  # one row per test image
    assert set(sub.tissue) <= set(task.classes)
    metrics = json.loads((paths.backbone_dir("tiny_cnn") / "metrics.json").read_text())
    assert metrics["metric"] == "balanced_accuracy"
    low, high = metrics["oof_score_ci95"]
    assert 0 <= low <= metrics["oof_score"] <= high <= 1
    assert metrics["classes"] == list(CSV_CLASSES)
    oof = pd.read_csv(paths.backbone_dir("tiny_cnn") / "oof.csv", dtype={"sample_index": str})
    assert [c for c in oof.columns if c.startswith("p_")] == task.prob_columns
    np.testing.assert_allclose(oof[task.prob_columns].sum(axis=1), 1.0, atol=1e-5)
    assert (paths.runs_dir / "report.html").stat().st_size > 10_000
