import contextlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cv_data import make_workdir, write_folds
from kit import CLASSES, PROB_COLUMNS
from kit.config import train_settings
from kit.paths import Paths
from kit.training.cv import resolve_params, run_cv
from kit.utils import KitError

REPO = Path(__file__).resolve().parents[1]
CFG = {"epochs": 1, "batch_size": 32, "warmup_epochs": 0}
BB = "tiny_cnn"


def _run(paths, **kw):
    settings = train_settings(kw.pop("cfg", CFG))
    return run_cv(paths, None, settings, backbone=BB, weights="random", **kw)


def _csv(path):
    return pd.read_csv(path, dtype={"sample_index": str}, keep_default_na=False)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished 3-fold run, shared read-only; tests that change things copy it."""
    paths = make_workdir(tmp_path_factory.mktemp("cv") / "w", n_folds=3)
    metrics = _run(paths)
    return paths, metrics


def _copy(done, tmp_path) -> Paths:
    shutil.copytree(done[0].root, tmp_path / "w")
    return Paths.from_root(tmp_path / "w")


def test_oof_covers_every_image_once_predicted_by_the_model_that_did_not_see_it(done):
    from kit.data.patches import load_patches

    paths, metrics = done
    out = paths.backbone_dir(BB)
    folds = _csv(paths.folds_csv)
    oof = _csv(out / "oof.csv")
    assert list(oof.columns) == ["sample_index", "fold", "label"] + PROB_COLUMNS
    assert PROB_COLUMNS[2] == "p_HER2(+)"
    assert oof.sample_index.tolist() == folds.sample_index.tolist()  # each once, folds order
    assert oof.fold.tolist() == folds.fold.tolist() and oof.label.tolist() == folds.label.tolist()
    np.testing.assert_allclose(oof[PROB_COLUMNS].sum(axis=1), 1.0, atol=1e-5)
    train = load_patches(paths, "train")
    for k in range(3):
        mark = json.loads((out / f"fold_{k}" / "done.json").read_text())
        val = set(folds.sample_index[folds.fold == k])
        assert set(mark["val_samples"]) == val
        assert not set(mark["train_samples"]) & val  # fold k's model never saw its OOF images
        assert set(mark["train_samples"]) | val == set(folds.sample_index)
        # ... and the OOF rows of fold k are what fold k's checkpoint predicts for them
        _assert_checkpoint_gives_oof(out, metrics["config"], train, folds, k, atol=1e-6)


def _assert_checkpoint_gives_oof(out, config, train, folds, k, atol):
    """Fold k's model.pt predicts exactly (to ``atol``) the OOF rows cv wrote for fold k."""
    from kit.metrics import aggregate
    from kit.training.build import build_model
    from kit.training.checkpoints import load_checkpoint
    from kit.training.predict import predict

    model, _ = build_model(BB, config, "random", patch_size=32)
    load_checkpoint(model, out / f"fold_{k}" / "model.pt")
    rows = np.flatnonzero(folds.fold.to_numpy() == k)
    probs = aggregate(predict(model, train.array, rows)["id"])
    view = _csv(out / "tta" / "oof_id.csv").iloc[rows]
    np.testing.assert_allclose(view[PROB_COLUMNS].to_numpy(), probs, atol=atol)


def test_test_probs_are_fold_mean_and_tta_mean(done):
    paths, metrics = done
    out = paths.backbone_dir(BB)
    test = _csv(out / "test.csv")
    assert list(test.columns) == ["sample_index"] + PROB_COLUMNS and len(test) == 8
    per_fold = np.mean([_csv(out / f"fold_{k}" / "test.csv")[PROB_COLUMNS].to_numpy()
                        for k in range(3)], axis=0)
    np.testing.assert_allclose(test[PROB_COLUMNS].to_numpy(), per_fold, atol=1e-6)
    views = metrics["views"]
    assert views == ["id", "hflip", "vflip"]
    for name in ("test", "oof"):
        per_view = [_csv(out / "tta" / f"{name}_{v}.csv")[PROB_COLUMNS].to_numpy() for v in views]
        main = _csv(out / f"{name}.csv")[PROB_COLUMNS].to_numpy()
        np.testing.assert_allclose(main, np.mean(per_view, axis=0), atol=1e-6)
    assert not np.allclose(per_view[0], per_view[1])  # views really differ


def test_metrics_flag_collapsed_folds_and_how_epochs_were_chosen(done):
    _, metrics = done
    assert set(metrics["collapsed_folds"]) == {f["fold"] for f in metrics["per_fold"]
                                              if f["collapsed"]}
    assert "collapsed" in metrics
    assert metrics["selection"]["early_stopping"] == "inner"
    assert metrics["selection"]["epochs_honest"] is True
    mark = json.loads((done[0].backbone_dir(BB) / "fold_0" / "done.json").read_text())
    sel = mark["selection"]
    assert sel["early_stopping"] == "inner" and sel["stop_samples"]
    assert set(sel["stop_samples"]) <= set(mark["train_samples"])  # never the OOF images
    assert not set(sel["stop_samples"]) & set(mark["val_samples"])


def test_metrics_and_records(done):
    paths, metrics = done
    out = paths.backbone_dir(BB)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["oof_macro_f1"] == pytest.approx(metrics["oof_macro_f1"])
    for key in ("folds_sha256", "oof_macro_f1", "oof_weighted_f1", "per_fold", "per_class",
                "confusion", "config", "weights_source", "versions", "trainable_params",
                "patch_keys"):
        assert key in on_disk, key
    from kit.data.folds import load_folds
    from kit.metrics import macro_f1

    assert on_disk["folds_sha256"] == load_folds(paths)[1]
    oof = _csv(out / "oof.csv")
    expected = macro_f1(oof.label, oof[PROB_COLUMNS].to_numpy())
    assert on_disk["oof_macro_f1"] == pytest.approx(expected)
    assert len(on_disk["per_fold"]) == 3 and np.sum(on_disk["confusion"]) == 24
    assert set(on_disk["per_class"]) == set(CLASSES)
    assert on_disk["patch_keys"] == {"train": "train-0", "test": "test-0"}
    assert on_disk["trainable_params"] > 0 and on_disk["weights_source"] == "random"
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "epochs: 1" in (out / "config.yaml").read_text()


def test_resume_trains_only_the_missing_folds(done, tmp_path, capsys):
    paths = make_workdir(tmp_path / "w", n_folds=3)
    out = paths.backbone_dir(BB)
    partial = _run(paths, fold=0)
    assert partial["assembled"] is False and partial["pending"] == [1, 2]
    assert not (out / "oof.csv").exists()  # nothing assembled from one fold
    stamp = {f: (out / "fold_0" / f).stat().st_mtime_ns
             for f in ("model.pt", "done.json", "oof.csv")}
    _run(paths)
    assert "fold 0: done earlier" in capsys.readouterr().out
    assert {f: (out / "fold_0" / f).stat().st_mtime_ns for f in stamp} == stamp
    # Same seed, same data: byte-identical to the uninterrupted run (CPU determinism).
    for name in ("oof.csv", "test.csv", "tta/oof_hflip.csv"):
        assert (out / name).read_bytes() == (done[0].backbone_dir(BB) / name).read_bytes(), name
    # A run killed inside fold 2 (no done.json yet) resumes there.
    (out / "fold_2" / "done.json").unlink()
    before = (out / "fold_1" / "model.pt").stat().st_mtime_ns
    _run(paths)
    text = capsys.readouterr().out
    assert "fold 1: done earlier" in text and "fold 2: 1 epochs" in text
    assert (out / "fold_1" / "model.pt").stat().st_mtime_ns == before
    assert (out / "fold_2" / "done.json").exists()


def test_changed_config_retrains_and_changed_folds_are_refused(done, tmp_path, capsys):
    paths = _copy(done, tmp_path)
    out = paths.backbone_dir(BB)
    folds = _csv(paths.folds_csv)
    write_folds(paths, folds.sample_index, folds.label, (folds.fold + 1) % 3)
    with pytest.raises(KitError, match="different folds file.*--restart"):
        _run(paths)
    with pytest.raises(KitError, match="different folds file"):
        _run(paths, fold=1)
    metrics = _run(paths, restart=True)
    assert metrics["folds_sha256"] != done[1]["folds_sha256"]
    assert _csv(out / "oof.csv").fold.tolist() == ((folds.fold + 1) % 3).tolist()
    capsys.readouterr()
    partial = _run(paths, cfg={**CFG, "head": {"depth": 0}}, fold=0)
    assert "fold 0: config changed since it was trained; retraining" in capsys.readouterr().out
    assert partial["assembled"] is False and partial["pending"] == [1, 2]  # no mixed configs


def test_missing_inputs_name_the_command_to_run(tmp_path):
    paths = make_workdir(tmp_path / "w")
    shutil.rmtree(paths.patches_dir("test", 32))
    with pytest.raises(KitError, match=r"run ./run.sh patches first"):
        _run(paths)
    paths.folds_csv.unlink()
    with pytest.raises(KitError, match=r"run ./run.sh folds first"):
        _run(paths)
    with pytest.raises(KitError, match="unknown backbone"):
        run_cv(paths, None, train_settings(), backbone="resnet9000")
    paths = make_workdir(tmp_path / "w2")
    folds = _csv(paths.folds_csv)
    write_folds(paths, folds.sample_index[:-1], folds.label[:-1], folds.fold[:-1])
    with pytest.raises(KitError, match="list different images"):
        _run(paths)
    with pytest.raises(KitError, match="--fold 7"):
        _run(make_workdir(tmp_path / "w3"), fold=7)


def test_params_tuned_best_none_and_file(tmp_path, capsys):
    paths = Paths.from_root(tmp_path)
    best = paths.tune_dir(BB) / "best.yaml"
    assert resolve_params("tuned", paths, BB, settings=train_settings()) == (
        {}, f"none ({best} not found)")
    with pytest.raises(KitError, match="run ./run.sh tune tiny_cnn"):
        resolve_params("best", paths, BB, settings=train_settings())
    best.parent.mkdir(parents=True)
    best.write_text("params:\n  head.depth: 0\n  augment.cutmix_alpha: 0.0\nscore: 0.5\ntrial: 3\n")
    assert resolve_params("tuned", paths, BB, settings=train_settings())[0] == {
        "head.depth": 0, "augment.cutmix_alpha": 0.0}
    assert resolve_params("none", paths, BB, settings=train_settings()) == ({}, "none")
    assert resolve_params(str(best), paths, BB, settings=train_settings())[0]["head.depth"] == 0
    with pytest.raises(KitError, match="no such file"):
        resolve_params("nothere.yaml", paths, BB, settings=train_settings())


def test_params_reach_the_model_and_the_records(tmp_path):
    paths = make_workdir(tmp_path / "w", n_folds=2)
    best = paths.tune_dir(BB) / "best.yaml"
    best.parent.mkdir(parents=True)
    best.write_text("params:\n  head.depth: 0\n  augment.cutmix_alpha: 0.0\n  epochs: 5\n")
    metrics = _run(paths, params="tuned")
    cfg = metrics["config"]
    assert cfg["head"]["depth"] == 0 and cfg["augment"]["cutmix_alpha"] == 0.0
    assert cfg["epochs"] == 1  # an explicit setting beats the tuned one
    # BatchNorm weight + bias of the 16, 32, 64, 64 channels, then a linear 64 -> 4 head
    assert metrics["trainable_params"] == 2 * (16 + 32 + 64 + 64) + 64 * 4 + 4
    with pytest.raises(KitError, match="unknown key"):
        _run(paths, params={"head.deepness": 2})


def test_cv_runs_a_vit(tmp_path):
    paths = make_workdir(tmp_path / "w", n_train=12, n_test=4, n_folds=2)
    metrics = run_cv(paths, None,
                     train_settings({**CFG, "phikon_mode": "interpolate", "tta": "none"}),
                     backbone="tiny_vit", weights="random")
    assert metrics["n_oof"] == 12 and metrics["views"] == ["id"]
    assert (paths.backbone_dir("tiny_vit") / "tta" / "test_id.csv").exists()


def test_cli_runs_and_reports_missing_inputs(tmp_path):
    paths = make_workdir(tmp_path / "w", n_train=12, n_test=4, n_folds=2)
    cmd = [str(REPO / "run.sh"), "cv", BB, "--workdir", str(paths.root), "--weights", "random",
           "--epochs", "1", "--params", "none", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    assert "trainable parameters" in done.stdout and "OOF macro F1" in done.stdout
    paths.folds_csv.unlink()
    failed = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert failed.returncode == 2 and "run ./run.sh folds first" in failed.stderr
    assert "Traceback" not in failed.stderr


# --------------------------------------------------------------------------- feature cache
# The MLP head: these tests follow its epochs (head.type auto would be the probe here).
FROZEN = {**CFG, "epochs": 4, "lr": 0.01, "train_norm": [], "unfreeze_last": 0,
          "head": {"type": "mlp"}}


def _tree(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A frozen-backbone run (cache path) counting the calls of both training paths."""
    import kit.training.cv
    import kit.training.cv_folds

    paths = make_workdir(tmp_path_factory.mktemp("cvf") / "w", n_folds=3)
    calls = {"features_cv": 0, "pixel_fold": 0}
    real_features_cv = kit.training.cv_folds.features_cv
    real_train_fold = kit.training.cv.train_pixel_fold

    def features_cv(*a, **kw):
        calls["features_cv"] += 1
        return real_features_cv(*a, **kw)

    def pixel_fold(*a, **kw):
        calls["pixel_fold"] += 1
        return real_train_fold(*a, **kw)

    log = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(log):
        mp.setattr(kit.training.cv_folds, "features_cv", features_cv)
        mp.setattr(kit.training.cv, "train_pixel_fold", pixel_fold)
        metrics = _run(paths, cfg=FROZEN, seed=5)
    return paths, metrics, dict(calls), log.getvalue()


def test_a_frozen_backbone_trains_heads_on_cached_embeddings(cached):
    paths, metrics, calls, log = cached
    assert calls == {"features_cv": 1, "pixel_fold": 0}  # one cache pass, no pixel training
    assert metrics["training_path"] == "feature_cache"
    assert "frozen backbone: training heads on cached embeddings" in log
    assert "pixel augmentation is not applied" in log and "augment.cutmix_alpha=1.0" in log
    assert metrics["feature_cache"]["not_applied"]["augment.color_jitter.p"] == 0.8
    assert list((paths.features_dir / BB).glob("train-*/features.npy"))
    assert list((paths.features_dir / BB).glob("test-*/features.npy"))
    # Only the head trains: a linear 64 -> 256 -> 4 MLP, no BatchNorm of the backbone.
    assert metrics["trainable_params"] == 64 * 256 + 256 + 256 * 4 + 4


def test_cache_path_gives_the_oof_of_features_cv(cached):
    from kit.training.feature_cv import features_cv

    paths, metrics, _, _ = cached
    out = paths.backbone_dir(BB)
    res = features_cv(BB, paths, settings=train_settings(FROZEN), seed=5, weights="random")
    oof, test = _csv(out / "oof.csv"), _csv(out / "test.csv")
    assert oof.sample_index.tolist() == res.oof.sample_index.tolist()
    assert oof.fold.tolist() == res.oof.fold.tolist()
    np.testing.assert_allclose(oof[PROB_COLUMNS], res.oof[PROB_COLUMNS], atol=1e-6)
    np.testing.assert_allclose(test[PROB_COLUMNS], res.test[PROB_COLUMNS], atol=1e-6)
    for v in ("id", "hflip", "vflip"):
        np.testing.assert_allclose(_csv(out / "tta" / f"oof_{v}.csv")[PROB_COLUMNS],
                                   res.oof_views[v][PROB_COLUMNS], atol=1e-6)
    assert metrics["oof_macro_f1"] == pytest.approx(res.oof_macro_f1)
    assert [f["macro_f1"] for f in metrics["per_fold"]] == \
        pytest.approx([f["macro_f1"] for f in res.per_fold])
    assert metrics["oof_macro_f1"] > 0.5  # the tint is learnt from frozen random features


def test_cache_path_writes_the_files_of_the_pixel_path(cached, done, tmp_path):
    from kit.data.patches import load_patches
    from kit.ensemble.blend import load_inputs

    paths, metrics, _, _ = cached
    out = paths.backbone_dir(BB)
    assert _tree(out) == _tree(done[0].backbone_dir(BB))  # model.pt and done.json included
    for name in ("oof.csv", "test.csv", "tta/test_vflip.csv", "fold_1/tta/oof_id.csv"):
        assert list(_csv(out / name).columns) == list(_csv(done[0].backbone_dir(BB) / name).columns)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert set(done[1]) <= set(on_disk)  # every key of the pixel path's metrics.json
    assert on_disk["folds_sha256"] == done[1]["folds_sha256"] != ""
    assert "training_path: feature_cache" in (out / "config.yaml").read_text()
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    # Fold k's checkpoint is the model behind its OOF rows (float16 cache: close, not equal).
    train = load_patches(paths, "train")
    folds = _csv(paths.folds_csv)
    for k in range(3):
        _assert_checkpoint_gives_oof(out, metrics["config"], train, folds, k, atol=2e-3)
    # The blender takes it beside a pixel-trained backbone.
    shutil.copytree(done[0].backbone_dir(BB), paths.backbone_dir("tiny_vit"))
    data = tmp_path / "data"
    (data / "train_data").mkdir(parents=True)
    (data / "test_data").mkdir()
    for i in _csv(out / "test.csv").sample_index:
        (data / "test_data" / i).touch()
    try:
        inputs = load_inputs(paths, data, [BB, "tiny_vit"], weight_views=True)
    finally:
        shutil.rmtree(paths.backbone_dir("tiny_vit"))
    assert inputs.oof.shape == (6, 24, 4) and inputs.test.shape == (6, 8, 4)


def test_cache_path_resumes_by_fold(cached, tmp_path, capsys):
    paths = make_workdir(tmp_path / "w", n_folds=3)
    out = paths.backbone_dir(BB)
    partial = _run(paths, cfg=FROZEN, seed=5, fold=1)
    assert partial["assembled"] is False and partial["pending"] == [0, 2]
    stamp = (out / "fold_1" / "done.json").stat().st_mtime_ns
    _run(paths, cfg=FROZEN, seed=5)
    text = capsys.readouterr().out
    assert "fold 1: done earlier" in text and "fold 2: 4 epochs" in text
    assert "embedded" not in text.split("fold 1: done earlier")[1]  # the cache was reused
    assert (out / "fold_1" / "done.json").stat().st_mtime_ns == stamp
    for name in ("oof.csv", "test.csv", "tta/oof_hflip.csv"):
        a = _csv(out / name)[PROB_COLUMNS].to_numpy()
        b = _csv(cached[0].backbone_dir(BB) / name)[PROB_COLUMNS].to_numpy()
        np.testing.assert_allclose(a, b, atol=1e-6)  # fold order does not matter


def test_training_path_needs_everything_frozen():
    from kit.training.settings import pixel_augment_not_applied, train_config, training_path

    # the default trains the norm layers
    assert training_path(train_config(train_settings())) == "pixels"
    assert training_path(train_config(train_settings({"train_norm": []}))) == "feature_cache"
    assert training_path(train_config(train_settings({"train_norm": []})),
                         feature_cache=False) == "pixels"
    assert training_path(train_config(train_settings({"train_norm": [],
                                                      "unfreeze_last": 1}))) == "pixels"
    cfg = train_config(train_settings({"train_norm": [], "augment": {"cutmix_alpha": 0.0,
                                                                     "hflip": 0.0}}))
    assert set(pixel_augment_not_applied(cfg)) == {"augment.color_jitter.p", "augment.rot90",
                                                   "augment.vflip"}


@pytest.mark.slow
def test_cli_frozen_backbone_and_no_feature_cache(tmp_path):
    paths = make_workdir(tmp_path / "w", n_train=12, n_test=4, n_folds=2)
    cmd = [str(REPO / "run.sh"), "cv", BB, "--workdir", str(paths.root), "--weights", "random",
           "--epochs", "1", "--params", "none", "--device", "cpu", "--train-norm", "none"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    assert "frozen backbone: training heads on cached embeddings" in done.stdout
    metrics = json.loads((paths.backbone_dir(BB) / "metrics.json").read_text())
    assert metrics["training_path"] == "feature_cache" and metrics["config"]["train_norm"] == []
    done = subprocess.run(cmd + ["--no-feature-cache"], capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stderr
    # The cache path's folds are not taken for pixel-trained ones: both retrain.
    assert "training on pixels" in done.stdout and "cached embeddings" not in done.stdout
    assert done.stdout.count("config changed since it was trained; retraining") == 2
    metrics = json.loads((paths.backbone_dir(BB) / "metrics.json").read_text())
    assert metrics["training_path"] == "pixels" and "feature_cache" not in metrics
    bad = subprocess.run(cmd[:-1] + ["instancenorm"], capture_output=True, text=True, timeout=400)
    assert bad.returncode == 2 and "train_norm = 'instancenorm' is not allowed" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- honesty
def _fold_rows(out) -> dict:
    """Each fold's OOF probability rows of a finished run in ``out``."""
    oof = _csv(out / "oof.csv").set_index("sample_index")
    return {k: oof[oof.fold == k][PROB_COLUMNS].to_numpy() for k in range(3)}


def _scramble_fold(paths: Paths, fold: int) -> None:
    """Give every image of ``fold`` another label, in the folds file and the patch cache."""
    folds = pd.read_csv(paths.folds_csv, dtype={"sample_index": str})
    sel = folds.fold == fold
    shifted = {c: CLASSES[(i + 1) % len(CLASSES)] for i, c in enumerate(CLASSES)}
    folds.loc[sel, "label"] = folds.loc[sel, "label"].map(shifted)
    write_folds(paths, folds.sample_index, folds.label, folds.fold)
    samples_csv = paths.patches_dir("train", 32) / "samples.csv"
    samples = pd.read_csv(samples_csv, dtype={"sample_index": str}, keep_default_na=False)
    relabel = dict(zip(folds.sample_index, folds.label))
    samples["label"] = samples.sample_index.map(relabel)
    samples.to_csv(samples_csv, index=False)


@pytest.mark.parametrize("cfg", [{**CFG, "epochs": 3, "patience": 1}, FROZEN],
                         ids=["pixels", "feature_cache"])
@pytest.mark.parametrize("mode", ["inner", "refit"])
def test_scrambling_a_folds_labels_leaves_its_oof_rows_unchanged(tmp_path, cfg, mode):
    paths = make_workdir(tmp_path / "w", n_folds=3)
    cfg = {**cfg, "early_stopping": mode}
    out = paths.backbone_dir(BB)

    before = _run(paths, cfg=cfg, seed=3)
    rows_before = _fold_rows(out)
    _scramble_fold(paths, 1)
    after = _run(paths, cfg=cfg, seed=3, restart=True)
    rows_after = _fold_rows(out)
    assert before["training_path"] == after["training_path"]
    assert after["selection"]["early_stopping"] == mode and after["selection"]["epochs_honest"]
    # Fold 1's rows come from a model that never read fold 1's labels, before and after...
    np.testing.assert_array_equal(rows_after[1], rows_before[1])
    # ...while the folds that trained on the scrambled labels did change.
    assert not all(np.array_equal(rows_after[k], rows_before[k]) for k in (0, 2))


@pytest.mark.parametrize("cfg", [
    {**FROZEN, "label_issues": {"mode": "drop", "inner_folds": 3}, "bag": 2},
    {**FROZEN, "label_issues": {"mode": "weight", "model": "logreg", "inner_folds": 3}},
    {**FROZEN, "head": {"type": "logreg"}, "bag": 2},
    {**CFG, "epochs": 2, "label_issues": {"mode": "drop", "inner_folds": 3}, "bag": 2},
], ids=["cache-drop-bag", "cache-weight-probe", "cache-logreg-bag", "pixels-drop-bag"])
def test_label_issues_and_bagging_never_read_a_folds_own_labels(tmp_path, cfg):
    """The scramble test for the noise levers: fold 1's OOF rows do not move when its labels
    are scrambled, every image is still predicted and scored, and no image is judged by the
    fold it is scored in."""
    paths = make_workdir(tmp_path / "w", n_folds=3)
    out = paths.backbone_dir(BB)

    before = _run(paths, cfg=cfg, seed=3)
    rows_before = _fold_rows(out)
    folds = _csv(paths.folds_csv)
    assert before["n_oof"] == len(folds)  # scored on every image, flagged or not
    assert before["bag"] == cfg.get("bag", 1)
    mode = cfg.get("label_issues", {}).get("mode", "off")
    assert before["label_issues"]["mode"] == mode
    if mode != "off":
        table = _csv(out / "label_issues.csv")
        own = dict(zip(folds.sample_index, folds.fold))
        assert set(table.sample_index) == set(folds.sample_index)
        assert (table.n_folds == 2).all()  # judged by the two folds that train on it
        for sid, by in zip(table.sample_index, table.flagged_by.astype(str)):
            assert str(own[sid]) not in by.split(";")
        for k in range(3):
            mark = json.loads((out / f"fold_{k}" / "done.json").read_text())
            assert mark["label_issues"]["n_train"] == len(mark["train_samples"])
    _scramble_fold(paths, 1)
    _run(paths, cfg=cfg, seed=3, restart=True)
    rows_after = _fold_rows(out)
    np.testing.assert_array_equal(rows_after[1], rows_before[1])
    assert not all(np.array_equal(rows_after[k], rows_before[k]) for k in (0, 2))
    if cfg.get("bag", 1) > 1:
        assert (out / "fold_0" / "model_bag1.pt").exists()


def test_attention_pooling_runs_on_both_paths(tmp_path):
    paths = make_workdir(tmp_path / "w", n_folds=3)
    frozen = {**CFG, "epochs": 3, "lr": 0.01, "train_norm": [], "unfreeze_last": 0,
              "head": {"pool": "attention"}}
    metrics = _run(paths, cfg=frozen, seed=1)
    assert metrics["training_path"] == "feature_cache" and metrics["aggregate"] == "attention"
    oof = _csv(paths.backbone_dir(BB) / "oof.csv")
    np.testing.assert_allclose(oof[PROB_COLUMNS].sum(axis=1), 1.0, atol=1e-5)

    def attention_sums():
        att = _csv(paths.backbone_dir(BB) / "attention.csv")
        assert set(att.sample_index) == set(oof.sample_index)
        assert att.groupby("sample_index").patch.count().eq(4).all()  # K = 4
        return att.groupby("sample_index").weight.sum().to_numpy()

    np.testing.assert_allclose(attention_sums(), 1.0, atol=1e-4)
    pixels = _run(paths, cfg={**CFG, "epochs": 2, "head": {"pool": "attention"}}, restart=True)
    assert pixels["training_path"] == "pixels" and pixels["aggregate"] == "attention"
    test = _csv(paths.backbone_dir(BB) / "test.csv")
    np.testing.assert_allclose(test[PROB_COLUMNS].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(attention_sums(), 1.0, atol=1e-4)
    _run(paths, cfg=CFG)  # a patch head retrains every fold: no attention file left behind
    assert not (paths.backbone_dir(BB) / "attention.csv").exists()


def test_the_inner_split_keeps_the_folds_files_groups_together(tmp_path):
    paths = make_workdir(tmp_path / "w", n_train=36, n_folds=3)
    folds = pd.read_csv(paths.folds_csv, dtype={"sample_index": str})
    # Pair images of one fold and one class into groups of two.
    folds["group"] = folds.sample_index
    for (_, _), part in folds.groupby(["fold", "label"]):
        names = part.sample_index.tolist()
        for a, b in zip(names[::2], names[1::2]):
            folds.loc[folds.sample_index == b, "group"] = a
    folds.to_csv(paths.folds_csv, index=False, lineterminator="\n")
    _run(paths, cfg={**CFG, "epochs": 2})
    group = dict(zip(folds.sample_index, folds.group))
    for k in range(3):
        mark = json.loads((paths.backbone_dir(BB) / f"fold_{k}" / "done.json").read_text())
        stop = set(mark["selection"]["stop_samples"])
        fit = set(mark["train_samples"]) - stop
        assert stop and {group[s] for s in stop}.isdisjoint({group[s] for s in fit})


def test_the_embedding_cache_settings_are_part_of_cvs_config(tmp_path):
    """``cv --set features.<key>=...`` reaches the cache: one config, resolved once."""
    from kit.config import stage_overrides

    paths = make_workdir(tmp_path / "w", n_folds=3)
    cfg = {**FROZEN, **stage_overrides(None, ["features.dtype=float32", "features.batch_size=8"])}
    metrics = _run(paths, cfg=cfg, seed=1)
    assert metrics["feature_cache"]["dtype"] == "float32"
    assert metrics["config"]["features"]["batch_size"] == 8
    meta = json.loads(next((paths.features_dir / BB).glob("train-*/meta.json")).read_text())
    assert meta["dtype"] == "float32"


# --------------------------------------------------------------------------- another task
PROBE = {**FROZEN, "head": {"type": "logreg"},
         "label_issues": {"mode": "drop", "inner_folds": 2}}


def _checked_splits(calls):
    """A stand-in for ``grouped_splits`` that records every split it makes (and the groups it
    was given) before returning it."""
    from kit.training import selection

    real = selection.grouped_splits

    def spy(y, groups=None, n_splits=5, seed=42, **kw):
        splits = real(y, groups, n_splits, seed, **kw)
        calls.append((None if groups is None else np.asarray(groups), splits))
        return splits
    return spy


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    """cv on another task (3 classes, balanced accuracy, patients as folds.csv's groups), on
    pixels and, with the probe and label issues, on cached embeddings; every inner split
    recorded."""
    import kit.training.label_issues
    import kit.training.selection
    from cv_data import make_task_workdir

    tmp = tmp_path_factory.mktemp("task")
    runs, calls = {}, []
    for name, cfg in (("pixels", {**CFG, "epochs": 2}), ("probe", PROBE)):
        paths, data = make_task_workdir(tmp / name, tmp / "data")
        log = io.StringIO()
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(log):
            mp.setattr(kit.training.selection, "grouped_splits", _checked_splits(calls))
            mp.setattr(kit.training.label_issues, "grouped_splits", _checked_splits(calls))
            metrics = run_cv(paths, data, train_settings(cfg), backbone=BB, weights="random",
                             seed=1)
        runs[name] = (paths, metrics, log.getvalue())
    return data, runs, calls


def _assert_scored_by_the_task(paths, metrics, log, task, an2dl_keys):
    from kit.metrics import score

    columns = ["p_Normal", "p_Benign", "p_Invasive"]
    assert task.prob_columns == columns
    out = paths.backbone_dir(BB)
    oof, test = _csv(out / "oof.csv"), _csv(out / "test.csv")
    assert list(oof.columns) == ["sample_index", "fold", "label", *columns]
    assert list(test.columns) == ["sample_index", *columns] and len(test) == 6
    assert list(_csv(out / "tta" / "oof_hflip.csv").columns) == list(oof.columns)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert set(an2dl_keys) <= set(on_disk)  # every key an AN2DL run writes, and:
    assert on_disk["metric"] == "balanced_accuracy"
    assert on_disk["classes"] == ["Normal", "Benign", "Invasive"]
    expected = score("balanced_accuracy", oof.label, oof[columns].to_numpy(), task.classes)
    assert on_disk["oof_score"] == pytest.approx(expected, abs=1e-12)
    assert on_disk["oof_score"] == pytest.approx(metrics["oof_score"], abs=1e-12)
    lo, hi = on_disk["oof_score_ci95"]
    assert lo <= on_disk["oof_score"] <= hi
    for f in on_disk["per_fold"]:
        rows = oof[oof.fold == f["fold"]]
        assert f["score"] == pytest.approx(
            score("balanced_accuracy", rows.label, rows[columns].to_numpy(), task.classes))
    assert set(on_disk["per_class"]) == set(task.classes)
    assert np.shape(on_disk["confusion"]) == (3, 3) and np.sum(on_disk["confusion"]) == len(oof)
    assert f"OOF balanced accuracy {on_disk['oof_score']:.3f} [" in log
    assert "macro F1" not in log.split("OOF balanced accuracy")[0]  # folds name the metric


def test_another_task_writes_its_columns_and_scores_by_its_metric(three_class, done):
    data, runs, _ = three_class
    for paths, metrics, log in runs.values():
        _assert_scored_by_the_task(paths, metrics, log, data.task, done[1])
    paths, metrics, _ = runs["probe"]
    assert metrics["training_path"] == "feature_cache"
    issues = _csv(paths.backbone_dir(BB) / "label_issues.csv")
    assert set(issues.suggested_label) <= set(data.task.classes)
    assert {"p_Normal", "p_Benign", "p_Invasive"} <= set(issues.columns)
    mark = json.loads((paths.backbone_dir(BB) / "fold_0" / "done.json").read_text())
    assert mark["metric"] == "balanced_accuracy" and "val_balanced_accuracy" in mark
    # The probe's C was chosen by the task's metric on the inner split.
    assert metrics["per_fold"][0]["val_balanced_accuracy_id"] == mark["val_balanced_accuracy"]


def test_every_inner_split_keeps_a_patient_on_one_side(three_class):
    """Early stopping's inner split, the probe's C and label issues' inner folds: with the
    patients of folds.csv planted as groups, no patient has images on both sides."""
    _, runs, calls = three_class
    folds = _csv(runs["pixels"][0].folds_csv)
    assert folds.group.nunique() < len(folds)  # patients with several images
    # label issues (2 inner folds x 3 outer folds) and the probe and early stopping (one
    # inner split per fold and model): every one of them was handed the patients.
    assert len(calls) >= 3 + 3 + 3
    for groups, splits in calls:
        assert groups is not None and len(set(groups)) < len(groups)
        for fit, held in splits:
            assert set(groups[fit]).isdisjoint(groups[held])
    group = dict(zip(folds.sample_index, folds.group))
    for paths, _, _ in runs.values():
        for k in range(3):
            mark = json.loads((paths.backbone_dir(BB) / f"fold_{k}" / "done.json").read_text())
            stop = set(mark["selection"]["stop_samples"])
            fit = set(mark["train_samples"]) - stop
            assert stop and {group[s] for s in stop}.isdisjoint({group[s] for s in fit})


def test_another_task_after_the_data_stages(tmp_path, done):
    """The whole way: a generated 3-class task through clean, patches and folds, then cv."""
    from kit.config import load_config
    from kit.data.clean import run_clean
    from kit.data.folds import run_folds
    from kit.data.patches import run_patches
    from kit.data.task_synth import write_task_dataset
    from kit.task import as_data

    data = as_data(str(write_task_dataset(tmp_path / "data", "csv", 0)))
    paths = Paths.from_root(tmp_path / "w")
    run_clean(paths, data, load_config("clean"))
    run_patches(paths, data, load_config("patches", {"size": 32, "stride": 16, "top_k": 4}))
    run_folds(paths, data, load_config("folds", {"n_splits": 3}), seed=0, force=True)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        metrics = run_cv(paths, data, train_settings(CFG), backbone=BB, weights="random")
    _assert_scored_by_the_task(paths, metrics, log.getvalue(), data.task, done[1])


def test_an2dl_runs_keep_their_hashes(done):
    """The hashes an AN2DL run had before tasks existed (main's, for these inputs): a fold is
    reused only when its hash matches, so a change would retrain every AN2DL run. Another
    task's fingerprint enters the hash."""
    from kit.task import default_task, load_task
    from kit.training.cv import config_hash
    from kit.training.settings import train_config

    keys = {"train": "train-0", "test": "test-0"}
    cfg = train_config(train_settings())
    before = "34915c6e834099d31be4a74c9016289fe251a4d06b7e1caec43e5ea951306c44"
    assert config_hash(BB, "random", 42, cfg, keys) == before
    assert config_hash(BB, "random", 42, cfg, keys, task=default_task()) == before
    # A frozen run with the MLP head, the default before head.type auto, keeps its hash; the
    # default head is now the probe there: another model, another hash.
    frozen = train_config(train_settings({"train_norm": [], "head": {"type": "mlp"}}))
    assert config_hash(BB, "random", 42, frozen, keys, "feature_cache", "float16", "cpu",
                       task=default_task()) == \
        "cf3dfc4755279581a8bf2df3bca808ba82eaa4f42597251c238114133fcb4c16"
    probe = train_config(train_settings({"train_norm": []}))
    assert probe["head"]["type"] == "logreg"
    assert config_hash(BB, "random", 42, probe, keys, "feature_cache", "float16", "cpu") != \
        "cf3dfc4755279581a8bf2df3bca808ba82eaa4f42597251c238114133fcb4c16"
    for other in (load_task("imagefolder"), default_task().model_copy(
            update={"metric": "balanced_accuracy"})):
        assert config_hash(BB, "random", 42, cfg, keys, task=other) != before
    mark = json.loads((done[0].backbone_dir(BB) / "fold_0" / "done.json").read_text())
    if mark["device"] == "cpu":  # the device type is part of the hash
        assert done[1]["config_hash"] == mark["config_hash"] == \
            "e6c4315d16d48109f653d3a0a1335e0488be026dec2b0794038354f2bb19e475"
    # ... and the AN2DL run names its metric: the same number as its macro F1.
    assert done[1]["metric"] == "macro_f1" and done[1]["classes"] == list(CLASSES)
    assert done[1]["oof_score"] == done[1]["oof_macro_f1"]
    assert done[1]["oof_score_ci95"] == done[1]["oof_macro_f1_ci95"]


def test_named_runs_of_one_backbone_coexist(tmp_path, capsys):
    # Two variants of tiny_cnn (cv --name): each in runs/<name>/, listed, compared by name.
    from kit.ensemble.compare import compare_runs
    from kit.ensemble.runs import format_runs, list_runs

    paths = make_workdir(tmp_path / "w", n_folds=3)
    mlp = _run(paths, cfg=FROZEN, name="cnn_mlp")
    probe = _run(paths, cfg={**FROZEN, "head": {"type": "logreg"}}, name="cnn_probe")
    assert (paths.runs_dir / "cnn_mlp" / "oof.csv").is_file()
    assert (paths.runs_dir / "cnn_probe" / "oof.csv").is_file()
    assert not (paths.runs_dir / BB).exists()
    assert mlp["run"] == "cnn_mlp" and probe["run"] == "cnn_probe" and probe["backbone"] == BB
    runs = {r["name"]: r for r in list_runs(paths)}
    assert set(runs) == {"cnn_mlp", "cnn_probe"}
    # On cached embeddings the default head is the probe: the MLP variant is the change.
    assert runs["cnn_mlp"]["changed"]["head.type"] == "mlp"
    assert not any(k.startswith("head.") for k in runs["cnn_probe"]["changed"])
    assert "cnn_probe" in format_runs(list(runs.values()))
    result = compare_runs("cnn_mlp", "cnn_probe", paths, n_boot=200)
    assert result["a"] == pytest.approx(mlp["oof_score"])
    assert result["b"] == pytest.approx(probe["oof_score"])
    with pytest.raises(KitError, match="run name 'blend': use letters"):
        _run(paths, cfg=FROZEN, name="blend")
