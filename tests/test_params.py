"""``cv --params``: parameters tuned for one training path are not silently applied to
another; where they come from is recorded (kit.training.params, kit.training.cv.resolve_params)."""
from __future__ import annotations

import pytest
import yaml

from cv_data import make_workdir
from kit.config import train_settings
from kit.paths import Paths
from kit.training.cv import resolve_params, run_cv
from kit.training.settings import train_config
from kit.utils import KitError

BB = "tiny_cnn"
FROZEN = {"train_norm": [], "unfreeze_last": 0}
# What a features search tunes (and fixes), as best.yaml holds it.
FEATURES_PARAMS = {"lr": 0.02, "weight_decay": 0.003, "epochs": 15, "patience": 0,
                   "head.depth": 2, "head.dropout": 0.1, "class_balance": "loss",
                   "label_smoothing": 0.1, "tta": "none", "augment.cutmix_alpha": 0.0}
PATH_SPECIFIC = ["epochs", "lr", "patience", "weight_decay"]


def write_best(paths: Paths, params: dict, **fields) -> None:
    best = paths.tune_dir(BB) / "best.yaml"
    best.parent.mkdir(parents=True, exist_ok=True)
    best.write_text(yaml.safe_dump({"params": params, **fields}))


def features_best(paths: Paths, **extra) -> None:
    write_best(paths, FEATURES_PARAMS, objective="features", training_path="feature_cache",
               early_stopping="inner", search_score=0.81, score=0.81, trials=30, trial=7,
               search_score_kind="search: best of 30 trials on all 5 folds: optimistic",
               **extra)


def test_features_params_on_a_pixel_cv_keep_only_what_means_the_same(tmp_path, capsys):
    paths = Paths.from_root(tmp_path)
    features_best(paths)
    # Default cv: trainable norm layers, CutMix: pixels.
    params, desc, source = resolve_params("best", paths, BB, with_source=True,
                                          settings=train_settings())
    assert sorted(set(FEATURES_PARAMS) - set(params)) == PATH_SPECIFIC
    assert params["head.depth"] == 2 and params["class_balance"] == "loss"
    assert params["label_smoothing"] == 0.1 and params["tta"] == "none"
    out = capsys.readouterr().out
    assert f"dropped {', '.join(PATH_SPECIFIC)}" in out
    assert "--train-norm none" in out and f"./run.sh tune {BB} --objective full" in out
    assert "4 dropped for pixels" in desc
    assert source["dropped"] == PATH_SPECIFIC and source["objective"] == "features"
    assert (source["source_path"], source["target_path"]) == ("feature_cache", "pixels")
    assert source["honest"] is False and source["score"] == 0.81
    assert source["tuned_on_same_folds"] is True  # no folds hash recorded: assume these
    assert "optimistic" in source["score_kind"]
    # cv on the cache (what the search trained): everything applies, nothing said.
    params, _, source = resolve_params("best", paths, BB, settings=train_settings(FROZEN),
                                       with_source=True)
    assert params == FEATURES_PARAMS and source["dropped"] == []
    assert "dropped" not in capsys.readouterr().out
    # Frozen, but --no-feature-cache: pixels again.
    params, _ = resolve_params("best", paths, BB, settings=train_settings(FROZEN),
                               feature_cache=False)
    assert "lr" not in params


def test_an_old_best_yaml_without_objective_is_taken_as_features(tmp_path, capsys):
    paths = Paths.from_root(tmp_path)
    write_best(paths, {"lr": 0.02, "head.depth": 0}, score=0.7, trial=3)
    params, _, source = resolve_params("tuned", paths, BB, with_source=True,
                                       settings=train_settings())
    assert params == {"head.depth": 0} and source["dropped"] == ["lr"]
    assert source["objective"] == "features" and source["objective_assumed"] is True
    assert "records no objective (written by an older kit): taken as features" in \
        capsys.readouterr().out


def test_full_params_fit_pixels_and_lose_their_optimiser_keys_on_the_cache(tmp_path):
    paths = Paths.from_root(tmp_path)
    write_best(paths, {"lr": 0.02, "head.depth": 1, "augment.cutmix_alpha": 0.5},
               objective="full", search_score=0.7, trials=10, trial=1)
    params, _ = resolve_params("best", paths, BB, settings=train_settings())
    assert params == {"lr": 0.02, "head.depth": 1, "augment.cutmix_alpha": 0.5}
    params, _, source = resolve_params("best", paths, BB, settings=train_settings(FROZEN),
                                       with_source=True)
    assert params == {"head.depth": 1, "augment.cutmix_alpha": 0.5}
    assert (source["source_path"], source["target_path"]) == ("pixels", "feature_cache")


def test_an_explicit_params_file(tmp_path, capsys):
    paths = Paths.from_root(tmp_path)
    hand = tmp_path / "mine.yaml"
    hand.write_text(yaml.safe_dump({"params": {"lr": 0.01, "head.depth": 0}}))
    params, _, source = resolve_params(str(hand), paths, BB, with_source=True,
                                       settings=train_settings())
    assert params == {"lr": 0.01, "head.depth": 0}  # hand-written: applied as given
    assert source["honest"] is True and source["tuned"] is False
    # A best.yaml given by path gets the same treatment as --params best.
    copied = tmp_path / "copied.yaml"
    copied.write_text(yaml.safe_dump({"params": FEATURES_PARAMS, "objective": "features",
                                      "trial": 2, "search_score": 0.5}))
    params, _, source = resolve_params(str(copied), paths, BB, with_source=True,
                                       settings=train_settings())
    assert source["spec"] == "file" and source["dropped"] == PATH_SPECIFIC
    assert str(copied) in capsys.readouterr().out
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump({"params": {"head.deepness": 1}}))
    with pytest.raises(KitError, match=r"typo.yaml: .*unknown key"):
        resolve_params(str(bad), paths, BB, settings=train_settings())
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({"params": {"lr": 0.1}, "objective": "pixels",
                                     "trial": 1}))
    with pytest.raises(KitError, match=r"wrong.yaml: objective must be one of features, full"):
        resolve_params(str(wrong), paths, BB, settings=train_settings())


def test_params_tuned_on_another_folds_file_do_not_bias_this_cv(tmp_path):
    paths = make_workdir(tmp_path / "w", n_train=8, n_test=2, k=1, n_folds=2)
    features_best(paths, folds_sha256="0" * 64)
    _, _, source = resolve_params("best", paths, BB, settings=train_settings(FROZEN),
                                  with_source=True)
    assert source["tuned_on_same_folds"] is False and source["honest"] is True
    from kit.data.folds import folds_hash

    features_best(paths, folds_sha256=folds_hash(paths))
    _, _, source = resolve_params("best", paths, BB, settings=train_settings(FROZEN),
                                  with_source=True)
    assert source["tuned_on_same_folds"] is True and source["honest"] is False
    _, _, source = resolve_params("none", paths, BB, with_source=True, settings=train_settings())
    assert source["honest"] is True


def test_a_pixel_cv_with_a_features_best_yaml_trains_and_records_without_them(tmp_path, capsys):
    paths = make_workdir(tmp_path / "w", n_train=12, n_test=2, k=2, n_folds=2)
    write_best(paths, {"lr": 0.5, "weight_decay": 0.9, "head.depth": 0}, objective="features",
               search_score=0.9, trials=5, trial=4)
    metrics = run_cv(paths, None, train_settings({"epochs": 1, "batch_size": 32, "warmup_epochs": 0,
                                     "tta": "none"}), backbone=BB, weights="random", params="tuned")
    assert "dropped lr, weight_decay" in capsys.readouterr().out
    cfg, default = metrics["config"], train_config(train_settings())
    assert cfg["lr"] == default["lr"] and cfg["weight_decay"] == default["weight_decay"]
    assert cfg["head"]["depth"] == 0 and metrics["training_path"] == "pixels"
    src = metrics["params_source"]
    assert src["dropped"] == ["lr", "weight_decay"] and src["kept"] == ["head.depth"]
    assert src["honest"] is False and "best of 5 trials" in src["why"]
