"""kit.data.synth, the one synthetic-data generator: presets, label noise, held-back test labels,
signal strength, plain style, and the in-memory patch caches and embeddings."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kit import CLASSES
from kit.data import synth
from kit.data.dataset import load_dataset
from kit.utils import KitError


def _plan(**kw):
    args = synth.preset("v2")
    args.update(kw)
    return synth.make_plan(args.pop("n_train"), args.pop("n_test"), **args)


def test_v2_preset_has_the_real_label_counts_junk_and_sizes():
    plan = _plan()
    train = [it for it in plan if it.split == "train"]
    test = [it for it in plan if it.split == "test"]
    assert len(train) == 691 and len(test) == 477
    counts = pd.Series([it.written for it in train]).value_counts().to_dict()
    assert counts == {"Luminal B": 220, "Luminal A": 205, "HER2(+)": 189, "Triple negative": 77}
    assert sum(it.kind == "cartoon" for it in train) == 60
    assert sum(it.kind == "green" for it in train) == 50
    assert {it.size[0] for it in plan} == {1024} and max(it.size[1] for it in plan) == 1433
    # test labels follow the same shares: Triple negative is the minority there too
    assert pd.Series([it.label for it in test]).value_counts().idxmin() == "Triple negative"


def test_label_noise_changes_only_written_labels_of_non_cartoons():
    clean, noisy = _plan(), _plan(label_noise=0.2)
    assert [(it.label, it.kind, it.host, it.size) for it in clean] == \
        [(it.label, it.kind, it.host, it.size) for it in noisy]  # pixels are the same
    flipped = [it for it in noisy if it.written != it.label]
    assert all(it.kind != "cartoon" and it.written in CLASSES for it in flipped)
    share = len(flipped) / sum(it.kind != "cartoon" for it in noisy)
    assert 0.16 < share < 0.24, share
    assert {it.split for it in flipped} == {"train", "test"}  # annotation errors on both sides
    assert all(it.written == it.label for it in clean)


def test_held_back_test_labels_are_written_apart_and_the_layout_still_validates(tmp_path):
    root = synth.generate(tmp_path / "d", n_train=14, n_test=6, short_side=48, seed=3,
                          label_noise=0.3, test_labels=True)
    held = synth.read_test_labels(root)
    plan = synth.make_plan(14, 6, short_side=48, seed=3, label_noise=0.3)
    assert held.sample_index.tolist() == [f"img_{i:04d}.png" for i in range(6)]
    assert held.label.tolist() == [it.written for it in plan if it.split == "test"]
    train = pd.read_csv(root / "train_labels.csv")
    assert train.label.tolist() == [it.written for it in plan if it.split == "train"]
    ds = load_dataset(root)
    assert len(ds.train) == 14 and len(ds.test) == 6
    without = synth.generate(tmp_path / "e", n_train=14, n_test=6, short_side=48, seed=3,
                             label_noise=0.3)
    assert not (without / synth.TEST_LABELS_CSV).exists()
    with pytest.raises(KitError, match="test_labels=True"):
        synth.read_test_labels(without)
    # only the label file differs: the images are the same
    for name in ("train_data/img_0003.png", "test_data/img_0002.png", "train_labels.csv"):
        assert (root / name).read_bytes() == (without / name).read_bytes()


def _item(label, size=(64, 160)):
    return synth.Item("train", 4, label, "real", size=size)


def test_the_class_lives_in_the_mask_and_signal_scales_it():
    img_a, mask = synth.draw(_item("Luminal A"), seed=1)
    img_b, mask_b = synth.draw(_item("HER2(+)"), seed=1)
    inside = mask > 0
    assert (mask == mask_b).all() and inside.any()
    assert (img_a[~inside] == img_b[~inside]).all()  # outside the mask: identical pixels
    assert (img_a[inside] != img_b[inside]).any()
    # signal 0: every class draws the same tumour, so the whole images are identical
    a0, _ = synth.draw(_item("Luminal A"), seed=1, signal=0.0)
    b0, _ = synth.draw(_item("Triple negative"), seed=1, signal=0.0)
    assert (a0 == b0).all()
    assert synth.phenotypes(1.0) == synth.TUMOUR
    strong = synth.phenotypes(3.0)
    sig = [n.sigma for n in strong.values()]
    base = [n.sigma for n in synth.TUMOUR.values()]
    assert np.ptp(sig) > np.ptp(base) and min(n.cover for n in strong.values()) > 0


def test_plain_style_is_flat_and_compresses_better(tmp_path):
    plain = synth.generate(tmp_path / "p", n_train=6, n_test=2, short_side=64, seed=2,
                           style="plain", n_cartoon=0, n_green=0)
    scan = synth.generate(tmp_path / "s", n_train=6, n_test=2, short_side=64, seed=2,
                          n_cartoon=0, n_green=0)
    size = {r: sum(p.stat().st_size for p in (r / "train_data").glob("img_*.png"))
            for r in (plain, scan)}
    assert size[plain] < size[scan]
    ds = load_dataset(plain)
    img = np.asarray(Image.open(ds.train[0].image)).reshape(-1, 3)
    _, counts = np.unique(img, axis=0, return_counts=True)
    assert counts.max() > 0.5 * len(img)  # one flat grey is most of the image
    # masks are the scan style's: same geometry
    assert (plain / "train_data/mask_0001.png").read_bytes() == \
        (scan / "train_data/mask_0001.png").read_bytes()


def test_changed_arguments_regenerate_same_ones_reuse(tmp_path):
    root = synth.generate(tmp_path / "d", n_train=12, n_test=2, short_side=48, signal=0.5)
    stamp = (root / "train_data/img_0000.png").stat().st_mtime_ns
    synth.generate(tmp_path / "d", n_train=12, n_test=2, short_side=48, signal=0.5)
    assert (root / "train_data/img_0000.png").stat().st_mtime_ns == stamp
    synth.generate(tmp_path / "d", n_train=12, n_test=2, short_side=48, signal=0.5,
                   test_labels=True)
    assert (root / synth.TEST_LABELS_CSV).exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"style": "fancy"}, "style"),
    ({"signal": -1.0}, "signal"),
    ({"label_noise": 1.0}, "label_noise"),
    ({"class_counts": {"Luminal A": 3}}, "class_counts"),
])
def test_bad_arguments_are_refused_with_one_line(tmp_path, kwargs, match):
    with pytest.raises(KitError, match=match):
        synth.generate(tmp_path / "x", n_train=12, n_test=2, short_side=48, **kwargs)
    assert not (tmp_path / "x").exists()
    with pytest.raises(KitError, match="unknown synthetic-data preset"):
        synth.preset("v3")


def test_patch_workdir_is_read_by_the_kits_loaders(tmp_path):
    from kit.data.folds import load_folds
    from kit.data.patches import INDEX_COLUMNS, load_patches

    paths = synth.write_patch_workdir(tmp_path / "w", n_train=16, n_test=3, k=2, size=16,
                                      n_folds=4, seed=2)
    train, test = load_patches(paths, "train"), load_patches(paths, "test")
    assert train.array.shape == (16, 2, 16, 16, 3) and test.array.shape == (3, 2, 16, 16, 3)
    # index.csv has the columns the patches stage writes today, region included (an old cache
    # without it would load with region -1)
    index = pd.read_csv(train.folder / "index.csv")
    assert list(index.columns) == list(INDEX_COLUMNS)
    assert (train.index.region == 1).all() and (test.index.region == 1).all()
    folds, _ = load_folds(paths)
    per_fold = pd.crosstab(folds.fold, folds.label)
    assert (per_fold.values == 1).all()  # 4 per class over 4 folds: one each
    # the class is a tint: mean colour per class differs as TINTS does
    y = np.array([CLASSES.index(c) for c in train.samples.label])
    means = np.array([np.asarray(train.array)[y == c].mean(axis=(0, 1, 2, 3)) for c in range(4)])
    assert (means.argmax(axis=1)[:3] == [0, 1, 2]).all() and means[3].max() < means[:3].max()


def test_stratified_folds_and_embeddings():
    y = np.array([0] * 10 + [1] * 5 + [3] * 5)
    fold = synth.stratified_folds(y, 5)
    assert (pd.crosstab(fold, y).values >= 1).all()
    shuffled = synth.stratified_folds(y, 5, rng=0)
    assert sorted(np.bincount(shuffled)) == sorted(np.bincount(fold))
    x, labels = synth.embeddings(300, 2, 3, 16, seed=0, signal=1.0)
    assert x.shape == (300, 2, 3, 16) and x.dtype == np.float16
    assert np.bincount(labels, minlength=4).argmin() == 3  # Triple negative is the minority
    img = x.astype(np.float32).mean(axis=(1, 2))
    centres = np.stack([img[labels == c].mean(0) for c in range(4)])
    pred = ((img[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    assert (pred == labels).mean() > 0.6  # chance is ~0.35 (the largest class)
