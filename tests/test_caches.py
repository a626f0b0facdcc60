"""Patch caches of several window sizes side by side: which one load_patches, cv and the
patches command pick, their one-line errors, and the move of an old-layout cache."""
from __future__ import annotations

import os

import pytest

from kit.cli import main
from kit.config import load_config, train_settings
from kit.data.caches import cached_sizes, pick_size
from kit.data.patches import load_patches, patches_for, run_patches
from kit.data.synth import write_patch_workdir
from kit.training.cv import run_cv
from kit.utils import KitError
from test_patches import _write_dataset, _write_outliers


@pytest.fixture
def two_sizes(tmp_path):
    """A dataset with caches of 16 and 24 px windows in one work directory."""
    from kit.paths import Paths

    root = _write_dataset(tmp_path / "data")
    paths = Paths.from_root(tmp_path / "work")
    _write_outliers(paths)
    for size in (16, 24):
        run_patches(paths, root, load_config("patches", {"size": size, "stride": 8, "top_k": 2,
                                                         "workers": 1}))
    return root, paths


def test_caches_of_two_sizes_coexist_and_are_picked_by_rule(two_sizes):
    root, paths = two_sizes
    assert cached_sizes(paths) == [16, 24]
    assert (paths.root / "runs/patches/16px/train/patches.npy").is_file()
    assert load_patches(paths, "train", 24).array.shape[2] == 24
    assert pick_size(paths, native=24) == 24  # the backbone's native size
    assert pick_size(paths, native=224, size=16) == 16  # asked for
    assert pick_size(paths, native=224, size="16") == 16
    with pytest.raises(KitError, match=r"16 px, 24 px exist but none of 224 px \(phikon's native "
                                       r"size\); run ./run.sh patches --backbone phikon, or pick "
                                       r"one with --set patches_size=16"):
        pick_size(paths, native=224, backbone="phikon")
    with pytest.raises(KitError, match=r"no 32 px patch cache .*run ./run.sh patches --size 32"):
        pick_size(paths, size=32)
    with pytest.raises(KitError, match="say which: --set patches_size"):
        load_patches(paths, "train")  # no size and two caches
    with pytest.raises(KitError, match="patches_size must be auto or a window size"):
        pick_size(paths, size="big")
    train, test = patches_for(paths, native=16)
    assert train.array.shape[2] == test.array.shape[2] == 16 and train.key != test.key


def test_one_cache_is_used_whatever_the_native_size(tmp_path):
    paths = write_patch_workdir(tmp_path / "w", size=32)
    assert pick_size(paths, native=224, backbone="phikon") == 32
    assert pick_size(paths) == 32
    empty = type(paths).from_root(tmp_path / "none")
    with pytest.raises(KitError, match=r"no patch cache under .*run ./run.sh patches --backbone "
                                       r"uni$"):
        pick_size(empty, native=224, backbone="uni")


def test_an_old_layout_cache_is_named_then_moved_by_the_next_build(two_sizes):
    root, paths = two_sizes
    for split in ("train", "test"):
        os.replace(paths.patches_dir(split, 16), paths.patches_root / split)
    os.rmdir(paths.patches_root / "16px")
    (paths.patches_root / "24px").rename(paths.root / "moved_away")
    with pytest.raises(KitError, match="old layout .*moves it into place"):
        load_patches(paths, "train")
    key = load_config("patches", {"size": 16, "stride": 8, "top_k": 2, "workers": 1})
    sets = run_patches(paths, root, key)
    assert sets["train"].folder == paths.patches_dir("train", 16)
    assert not (paths.patches_root / "train").exists()
    assert sets["train"].meta["n_samples"] == 5  # moved, found valid: not rebuilt empty


def test_patches_command_backbone_sets_the_native_size(two_sizes, capsys):
    root, paths = two_sizes
    base = ["patches", "--data", str(root), "--workdir", str(paths.root), "--stride", "112",
            "--top-k", "1", "--workers", "1"]
    assert main(base + ["--backbone", "tiny_vit", "--split", "test"]) == 0
    assert "of 224 px" in capsys.readouterr().out
    assert cached_sizes(paths) == [16, 24, 224]
    assert main(base + ["--backbone", "tiny_vit", "--size", "16"]) == 2
    assert "--backbone sets the window size to its native one" in capsys.readouterr().err
    assert main(base + ["--set", "size=auto"]) == 2
    assert "size auto needs a backbone: ./run.sh patches --backbone" in capsys.readouterr().err


def test_cv_trains_on_the_cache_it_is_told_or_fails_naming_the_command(tmp_path):
    paths = write_patch_workdir(tmp_path / "w", n_train=12, n_test=4, size=16, seed=0)
    write_patch_workdir(tmp_path / "w", n_train=12, n_test=4, size=24, seed=1)
    cfg = {"epochs": 1, "batch_size": 32, "warmup_epochs": 0, "train_norm": "none",
           "early_stopping": "none"}
    with pytest.raises(KitError, match=r"none of 224 px \(tiny_cnn's native size\); run "
                                       r"./run.sh patches --backbone tiny_cnn"):
        run_cv(paths, None, train_settings(cfg), backbone="tiny_cnn", weights="random",
               params="none")
    metrics = run_cv(paths, None, train_settings({**cfg, "patches_size": 24}), backbone="tiny_cnn",
                     weights="random", params="none")
    assert metrics["patch_keys"] == {"train": "train-1", "test": "test-1"}
