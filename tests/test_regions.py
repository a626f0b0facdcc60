"""Windows spread over mask regions (``select: per_region``): region labelling, the allotment of
K windows by area, and a planted multi-region image through the patches stage and command."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kit import CLASSES
from kit.cli import main
from kit.config import load_config
from kit.data.cutting import cut_windows, pick_windows
from kit.data.patches import load_patches, run_patches
from kit.data.regions import allot, label_regions, region_windows
from kit.data.windows import window_scores
from kit.paths import Paths
from kit.utils import KitError

SIZE, STRIDE, K, MIN_PX = 16, 8, 6, 30


def planted_mask(h: int = 96, w: int = 160) -> np.ndarray:
    """One huge region (left, 60 x 80 px) and two small ones (8 x 8 and 6 x 7 px, right), plus
    a speck of 2 px below the minimum size."""
    m = np.zeros((h, w), bool)
    m[10:70, 5:85] = True  # region 1: 4800 px
    m[20:28, 120:128] = True  # 64 px
    m[80:86, 140:147] = True  # 42 px
    m[90:91, 100:102] = True  # 2 px: under MIN_PX
    return m


def planted_image(h: int = 96, w: int = 160) -> np.ndarray:
    img = np.full((h, w, 3), 225, np.uint8)
    img[planted_mask(h, w)] = (150, 60, 140)
    return img


# --------------------------------------------------------------------------- allotment
def test_label_regions_numbers_eight_connected_regions_in_raster_order():
    m = np.zeros((6, 8), bool)
    m[0, 5:7] = True  # first pixel met in raster order
    m[2, 1] = m[3, 2] = True  # diagonal neighbours: one region
    labels, areas = label_regions(m)
    assert areas.tolist() == [2, 2]
    assert labels[0, 5] == 1 and labels[2, 1] == labels[3, 2] == 2
    assert label_regions(np.zeros((3, 3), bool))[1].size == 0


def test_allot_is_proportional_with_one_per_region_above_the_minimum():
    # 1 each, the other 6 by largest remainder of 6 * (80, 15, 5) / 100 = 4.8, 0.9, 0.3
    assert allot([80, 15, 5, 2], 9, min_px=5).tolist() == [6, 2, 1, 0]
    assert allot([80, 15, 5, 2], 9, min_px=5).sum() == 9
    # more eligible regions than windows: the largest get one each, equal areas by lower id
    assert allot([10, 30, 20, 30], 2, min_px=1).tolist() == [0, 1, 0, 1]
    # no region reaches the minimum: the largest is eligible all the same
    assert allot([3, 4, 2], 5, min_px=100).tolist() == [0, 5, 0]
    # equal remainders (0.5, 0.5): the larger region first, then the lower id
    assert allot([1, 3], 4, min_px=1).tolist() == [1, 3]
    assert allot([10, 10, 20], 5, min_px=1).tolist() == [2, 1, 2]
    assert allot([], 4, min_px=1).tolist() == []


def test_region_windows_fill_from_the_mask_when_a_region_has_too_few():
    m = np.zeros((32, 64), bool)
    m[:, :40] = True  # region 1
    m[4:6, 60:62] = True  # region 2: 4 px, touched by few windows
    labels, areas = label_regions(m)
    cov = window_scores(m, 16, 16)[0]  # 2 x 4 windows, no overlap
    flat, region = region_windows(labels, areas, 16, 16, 6, 1, cov)
    assert len(flat) == 6 and len(set(flat.tolist())) == 6
    # region 2 lies in one window only: it gets it, the rest comes by mask coverage
    assert (region == 2).sum() == 1
    assert flat[region == 2].tolist() == [3]  # top row, last column
    # 7 windows, k = 10: everything once, then repeats (as top_k does)
    flat, region = region_windows(labels, areas, 16, 16, 10, 1, cov)
    assert len(flat) == 10 and len(set(flat.tolist())) == 8


# --------------------------------------------------------------------------- planted image
def test_per_region_takes_windows_from_every_region_above_the_minimum():
    mask, image = planted_mask(), planted_image()
    labels, areas = label_regions(mask)
    assert areas.tolist() == [4800, 64, 42, 2]
    top = pick_windows(mask, SIZE, STRIDE, K, image, select="top_k")
    spread = pick_windows(mask, SIZE, STRIDE, K, image, select="per_region", min_region_px=MIN_PX)
    # top_k: every window from the huge region; per_region: each region above the minimum
    assert set(top[4].tolist()) == {1}
    assert set(spread[4].tolist()) == {1, 2, 3}
    assert (spread[4] == 1).sum() == K - 2
    for x, y, r in zip(spread[0], spread[1], spread[4]):
        assert labels[y:y + SIZE, x:x + SIZE].__eq__(r).any()  # the window shows its region
    # round robin: each region's best window first
    assert spread[4][:3].tolist() == [1, 2, 3]
    # a lower minimum brings in the speck too; determinism
    speck = pick_windows(mask, SIZE, STRIDE, K, image, select="per_region", min_region_px=2)
    assert set(speck[4].tolist()) == {1, 2, 3, 4}
    again = pick_windows(mask, SIZE, STRIDE, K, image, select="per_region", min_region_px=2)
    assert all(np.array_equal(a, b) for a, b in zip(speck[:3] + speck[4:], again[:3] + again[4:]))


def test_cut_windows_show_their_regions_and_the_fallback_has_none():
    mask, image = planted_mask(), planted_image()
    xs, ys, _, fallback, region = pick_windows(mask, SIZE, STRIDE, K, image, select="per_region",
                                               min_region_px=MIN_PX)
    assert not fallback and set(region.tolist()) == {1, 2, 3}
    for p, x, y in zip(cut_windows(image, xs, ys, SIZE), xs, ys):
        assert np.array_equal(p, image[y:y + SIZE, x:x + SIZE])
    *_, fallback, region = pick_windows(np.zeros_like(mask), SIZE, STRIDE, K, image,
                                        select="per_region")
    assert fallback and (region == 0).all()


@pytest.fixture
def planted_ds(tmp_path):
    """Two training and one test image, each with the planted mask; no outliers."""
    root = tmp_path / "data"
    labels = []
    for split, n in (("train", 2), ("test", 1)):
        folder = root / f"{split}_data"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(planted_image()).save(folder / f"img_{i:04d}.png")
            Image.fromarray(planted_mask().astype(np.uint8) * 255).save(
                folder / f"mask_{i:04d}.png")
            labels.append((f"img_{i:04d}.png", CLASSES[i]))
    pd.DataFrame(labels[:2], columns=["sample_index", "label"]).to_csv(
        root / "train_labels.csv", index=False)
    paths = Paths.from_root(tmp_path / "work")
    paths.folds_dir.mkdir(parents=True)
    paths.outliers_csv.write_text("sample_index,reason,score\n")
    return root, paths


def test_run_patches_per_region_caches_regions_under_its_own_key(planted_ds):
    root, paths = planted_ds
    cfg = {"size": SIZE, "stride": STRIDE, "top_k": K, "workers": 1, "min_region_px": MIN_PX}
    top = run_patches(paths, root, load_config("patches", cfg))["train"]
    assert set(top.index.region) == {1}
    spread = run_patches(paths, root, load_config("patches", {**cfg, "select": "per_region"}))
    train = spread["train"]
    assert train.key != top.key and train.meta["config"]["select"] == "per_region"
    for _, rows in train.index.groupby("sample_index"):
        assert set(rows.region) == {1, 2, 3}
    # the minimum enters the key
    other = run_patches(paths, root, load_config("patches", {**cfg, "select": "per_region",
                                                             "min_region_px": 2}))["train"]
    assert other.key != train.key and 4 in set(other.index.region)
    with pytest.raises(KitError,
                       match="select = 'regions' is not allowed: one of top_k, per_region"):
        run_patches(paths, root, load_config("patches", {**cfg, "select": "regions"}))
    with pytest.raises(KitError, match="min_region_px = .* is not allowed: an integer >= 1"):
        run_patches(paths, root, load_config("patches", {**cfg, "min_region_px": 0}))


def test_patches_command_select_per_region(planted_ds, capsys):
    root, paths = planted_ds
    argv = ["patches", "--data", str(root), "--workdir", str(paths.root), "--size", str(SIZE),
            "--stride", str(STRIDE), "--top-k", str(K), "--workers", "1",
            "--set", "select=per_region", "--set", f"min_region_px={MIN_PX}"]
    assert main(argv) == 0
    assert "(per_region)" in capsys.readouterr().out
    test = load_patches(paths, "test")
    assert set(test.index.region) == {1, 2, 3}
    index = pd.read_csv(test.folder / "index.csv")
    assert list(index.columns) == ["sample_index", "patch", "x", "y", "coverage", "region"]


def test_old_index_without_regions_still_loads(planted_ds):
    root, paths = planted_ds
    cfg = load_config("patches", {"size": SIZE, "stride": STRIDE, "top_k": K, "workers": 1})
    folder = run_patches(paths, root, cfg, splits=("train",))["train"].folder
    index = pd.read_csv(folder / "index.csv")
    index.drop(columns="region").to_csv(folder / "index.csv", index=False)
    assert (load_patches(paths, "train").index.region == -1).all()
