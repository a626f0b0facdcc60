"""Feature fusion (``cv a+b``, kit/training/fusion.py) and its comparison with the blend of the
separate runs (kit/ensemble/fusion_vs_blend.py): the usual files, a head as wide as both backbones,
caches shared with the single runs, resume, the hash following a part's cache key, clear
errors for bad names and pixel-path settings."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from cv_data import make_workdir
from kit import PROB_COLUMNS
from kit.config import load_config, train_settings
from kit.ensemble.fusion_vs_blend import BLEND_SOURCE, MEAN_SOURCE, compare_all
from kit.metrics import macro_f1, paired_bootstrap, to_indices
from kit.paths import Paths
from kit.training.cv import run_cv
from kit.training.fusion import FusedBackbone, parse_weights, split_name
from kit.utils import KitError

A, B = "tiny_cnn", "tiny_vit"
FUSED = f"{A}+{B}"
CFG = {"epochs": 3, "batch_size": 32, "warmup_epochs": 0, "lr": 0.01}
# The MLP head (head.type auto would be the probe on these cached embeddings).
FROZEN = {**CFG, "train_norm": [], "unfreeze_last": 0, "head": {"type": "mlp"}}


def _csv(path):
    return pd.read_csv(path, dtype={"sample_index": str}, keep_default_na=False)


def _logged(fn):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = fn()
    return result, out.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two single frozen runs, then the fused one (its frozen settings by default)."""
    paths = make_workdir(tmp_path_factory.mktemp("fusion") / "w", n_train=16, n_test=4,
                          n_folds=3)
    single = {bb: run_cv(paths, None, train_settings(FROZEN), backbone=bb, seed=5, weights="random",
                         params="none")
              for bb in (A, B)}
    fused, log = _logged(lambda: run_cv(paths, None, train_settings(CFG), backbone=FUSED, seed=5,
                                        weights="random", params="none"))
    return paths, single, fused, log


def _tree(out) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def test_a_fused_run_writes_the_usual_files_with_a_head_as_wide_as_both(runs):
    paths, single, fused, log = runs
    out = paths.backbone_dir(FUSED)
    assert _tree(out) == _tree(paths.backbone_dir(A))  # oof, test, tta, metrics, folds...
    assert fused["training_path"] == "feature_cache" and fused["backbone"] == FUSED
    record = fused["config"]["fusion"]
    assert record["parts"] == [A, B] and record["input_width"] == 64 + 64
    assert {n: p["num_features"] for n, p in record["backbones"].items()} == {A: 64, B: 64}
    head = torch.load(out / "fold_0" / "model.pt", weights_only=True)["state_dict"]
    first = [v for k, v in head.items() if k.startswith("head.") and v.ndim == 2][0]
    assert first.shape[1] == 128  # the head reads both backbones' features side by side
    # The default head on cached embeddings, the probe: one linear layer 128 -> 4.
    assert fused["config"]["head"]["type"] == "logreg"
    assert fused["trainable_params"] == 128 * 4 + 4
    assert fused["weights_source"] == {A: "random", B: "random"}
    assert fused["config"]["weights"] == {A: "random", B: "random"}
    assert fused["config"]["train_norm"] == []  # a fused run freezes its parts by default
    text = (out / "config.yaml").read_text()
    assert "fusion:" in text and record["backbones"][B]["feature_keys"]["train"] in text
    oof = _csv(out / "oof.csv")
    assert list(oof.columns) == ["sample_index", "fold", "label", *PROB_COLUMNS]
    assert len(oof) == 16 and len(_csv(out / "test.csv")) == 4
    assert fused["oof_macro_f1"] > 0.5
    assert "frozen backbones: training heads on cached embeddings" in log


def test_each_part_reads_the_cache_its_own_run_built(runs):
    paths, single, fused, log = runs
    assert "embedded" not in log  # both caches came from the single runs
    for bb in (A, B):
        own = json.loads((paths.backbone_dir(bb) / "fold_0" / "done.json").read_text())
        part = fused["config"]["fusion"]["backbones"][bb]
        assert part["feature_keys"]["train"] == own["feature_cache"]["train_key"]
        assert part["feature_keys"]["test"] == own["feature_cache"]["test_key"]
        assert len(list((paths.features_dir / bb).glob("train-*"))) == 1


def test_the_fused_checkpoint_is_a_pixel_model_of_the_concatenated_embeddings(runs):
    from kit.data.patches import load_patches
    from kit.models.normalize import normalize_batch
    from kit.training.build import recalibrate_random
    from kit.training.features import frozen_backbone
    from kit.training.settings import train_config

    paths, _, fused, _ = runs
    train = load_patches(paths, "train")
    cfg = train_config(train_settings(FROZEN))
    parts = {}
    for bb in (A, B):
        parts[bb] = frozen_backbone(bb, cfg, "random", 5, patch_size=32)
        recalibrate_random(parts[bb], cfg, train.array, None, "cpu", data_key=train.key)
    model = FusedBackbone(parts, 32).eval()
    x = torch.from_numpy(np.array(train.array[:2])).reshape(-1, 32, 32, 3)
    with torch.no_grad():
        got = model(normalize_batch(x, model.mean, model.std, model.input_size)).numpy()
    cached = [np.load(next((paths.features_dir / bb).glob("train-*")) / "features.npy")
              for bb in (A, B)]
    want = np.concatenate([c[:2, :, 0].reshape(-1, 64) for c in cached], axis=1)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-3)  # float16 cache


def test_a_rerun_resumes_without_retraining(runs):
    paths, _, fused, _ = runs
    out = paths.backbone_dir(FUSED)
    stamps = [(out / f"fold_{k}" / "done.json").stat().st_mtime_ns for k in range(3)]
    again, log = _logged(lambda: run_cv(paths, None, train_settings(CFG), backbone=FUSED, seed=5,
                                        weights="random", params="none"))
    assert log.count("done earlier") == 3 and "embedded" not in log
    assert [(out / f"fold_{k}" / "done.json").stat().st_mtime_ns for k in range(3)] == stamps
    assert again["config_hash"] == fused["config_hash"]
    assert again["oof_macro_f1"] == fused["oof_macro_f1"]


def test_a_changed_part_cache_key_changes_the_fused_hash(tmp_path):
    from kit.models.backbones import create_backbone

    paths = make_workdir(tmp_path / "w", n_train=12, n_test=4, n_folds=2)
    file = tmp_path / "cnn.pt"
    torch.manual_seed(0)
    torch.save(create_backbone(A, "random", patch_size=32).state_dict(), file)
    weights = {A: str(file), B: "random"}
    first = run_cv(paths, None, train_settings(CFG), backbone=FUSED, weights=weights, fold=0,
                   params="none")
    torch.manual_seed(1)  # same file name, other weights: another cache key for tiny_cnn
    torch.save(create_backbone(A, "random", patch_size=32).state_dict(), file)
    second, log = _logged(lambda: run_cv(paths, None, train_settings(CFG), backbone=FUSED,
                                         weights=weights, fold=0, params="none"))
    h1, h2 = first["folds"][0]["config_hash"], second["folds"][0]["config_hash"]
    assert h1 != h2 and "config changed since it was trained; retraining" in log
    mark = json.loads((paths.backbone_dir(FUSED) / "fold_0" / "done.json").read_text())
    assert mark["config_hash"] == h2 and mark["weights_source"][A] == f"local:{file}"


@pytest.mark.parametrize("name, words", [
    ("tiny_cnn+nope", ["unknown backbone in 'tiny_cnn+nope': 'nope'", "tiny_vit"]),
    ("tiny_cnn+", ["unknown backbone", "''"]),
    ("nope", ["unknown backbone: 'nope'", "tiny_cnn"]),
    ("tiny_cnn+tiny_cnn", ["named twice"])])
def test_bad_names_fail_clearly(tmp_path, name, words):
    paths = make_workdir(tmp_path / "w", n_train=8, n_test=4, n_folds=2)
    with pytest.raises(KitError, match="unknown backbone|named twice") as err:
        run_cv(paths, None, train_settings(CFG), backbone=name, weights="random")
    assert all(w in str(err.value) for w in words) and "\n" not in str(err.value)
    assert not paths.backbone_dir(name).exists()


@pytest.mark.parametrize("cfg, feature_cache, word", [
    ({**CFG, "unfreeze_last": 1}, True, "unfreeze_last 1"),
    ({**CFG, "train_norm": ["batchnorm"]}, True, "train_norm ['batchnorm']"),
    (CFG, False, "--no-feature-cache")])
def test_settings_that_need_pixels_are_refused(tmp_path, cfg, feature_cache, word):
    paths = make_workdir(tmp_path / "w", n_train=8, n_test=4, n_folds=2)
    with pytest.raises(KitError, match="trains one head on cached embeddings only") as err:
        run_cv(paths, None, train_settings(cfg), backbone=FUSED, weights="random",
               feature_cache=feature_cache)
    assert word in str(err.value) and "\n" not in str(err.value)


def test_weights_per_backbone():
    assert split_name(FUSED) == [A, B] and split_name(A) == [A]
    assert parse_weights(A, None) == "auto" and parse_weights(A, ["x/w.pt"]) == "x/w.pt"
    assert parse_weights(A, [f"{A}=x/w.pt"]) == "x/w.pt"
    assert parse_weights(FUSED, None) == {A: "auto", B: "auto"}
    assert parse_weights(FUSED, ["random"]) == {A: "random", B: "random"}
    assert parse_weights(FUSED, [f"{B}=v.safetensors"]) == {A: "auto", B: "v.safetensors"}
    assert parse_weights(FUSED, ["random", f"{A}=c.pt"]) == {A: "c.pt", B: "random"}
    with pytest.raises(KitError, match="one value per backbone"):
        parse_weights(FUSED, ["w.pt"])
    with pytest.raises(KitError, match="one value per backbone"):
        parse_weights(FUSED, ["uni=w.pt"])  # not a part of this run
    with pytest.raises(KitError, match="given twice"):
        parse_weights(FUSED, [f"{A}=a.pt", f"{A}=b.pt"])
    with pytest.raises(KitError, match="one value"):
        parse_weights(A, ["a.pt", "b.pt"])


def test_the_cli_takes_a_fused_name_and_weights_per_backbone(runs, tmp_path, capsys):
    from kit.cli import main

    src, _, fused, _ = runs
    shutil.copytree(src.root, tmp_path / "w")
    args = ["cv", FUSED, "--workdir", str(tmp_path / "w"), "--weights", f"{A}=random",
            "--weights", f"{B}=random", "--seed", "5", "--epochs", "3", "--params", "none",
            "--device", "cpu", "--set", "lr=0.01", "--set", "batch_size=32", "--set",
            "warmup_epochs=0"]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr()
    assert (out.out + out.err).count("done earlier") == 3  # the same run as the API's
    assert main(["cv", f"{A}+nope", "--workdir", str(tmp_path / "w")]) == 2
    assert "unknown backbone in" in capsys.readouterr().err


def test_fusion_is_compared_with_the_mean_then_with_the_blend_of_its_parts(runs, tmp_path):
    from kit.submission.blend_output import run_blend

    paths, single, fused, _ = runs
    [c], notes = compare_all(paths)
    assert notes == [] and c.fused == FUSED and c.parts == [A, B] and c.optimistic == []
    oof = _csv(paths.backbone_dir(FUSED) / "oof.csv")
    y = to_indices(oof.label.to_numpy())
    assert c.fused_f1 == pytest.approx(fused["oof_macro_f1"])
    assert c.fused_ci == pytest.approx(fused["oof_macro_f1_ci95"])
    mean = np.mean([_csv(paths.backbone_dir(bb) / "oof.csv")[PROB_COLUMNS].to_numpy()
                    for bb in (A, B)], axis=0)
    assert c.blend_source == MEAN_SOURCE and c.blend_f1 == pytest.approx(macro_f1(y, mean))
    pair = paired_bootstrap(y, mean, oof[PROB_COLUMNS].to_numpy())
    assert c.diff == pytest.approx(pair["diff"]) and c.diff_ci == pytest.approx(pair["ci95"])
    # A blend of exactly the two parts: its nested (honest) OOF predictions are used.
    shutil.copytree(paths.root, tmp_path / "w")
    paths = Paths.from_root(tmp_path / "w")
    data = tmp_path / "data"
    (data / "train_data").mkdir(parents=True)
    (data / "test_data").mkdir()
    for i in _csv(paths.backbone_dir(A) / "test.csv").sample_index:
        (data / "test_data" / i).touch()
    result = run_blend(paths, data, load_config("blend"), backbones=[A, B], seed=0)
    [c], _ = compare_all(paths)
    assert c.blend_source == BLEND_SOURCE
    assert c.blend_f1 == pytest.approx(result.scores["nested"]["macro_f1"])


def test_a_fused_run_without_its_parts_gets_a_note(runs, tmp_path):
    paths, _, _, _ = runs
    shutil.copytree(paths.backbone_dir(FUSED), tmp_path / "runs" / FUSED)
    found, notes = compare_all(Paths.from_root(tmp_path))
    assert found == [] and notes == [f"{FUSED}: no separate run of {A}, {B} to blend "
                                      f"(./run.sh cv {A})"]
