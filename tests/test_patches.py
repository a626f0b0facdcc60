"""Mask-guided patches: window ranking, fallback, padding, the per-split cache, the command
and ``bench patches``, on tiny generated PNGs."""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kit import CLASSES
from kit.cli import main
from kit.config import load_config
from kit.data.cutting import cut_windows, extract_file, pick_windows, tissue_mask
from kit.data.dataset import read_image, read_mask
from kit.data.patches import load_patches, run_patches
from kit.data.windows import select_windows, window_scores, window_starts
from kit.paths import Paths
from kit.utils import KitError

CFG = {"size": 16, "stride": 8, "top_k": 3, "workers": 1}


def build(data, paths, overrides=None, **kwargs):
    """run_patches on patches.yaml resolved with ``overrides``, as the command resolves it."""
    return run_patches(paths, data, load_config("patches", overrides), **kwargs)


# --------------------------------------------------------------------------- helpers
def _brute_force(mask, size, stride, k, tissue=None):
    """Reference: explicit double loop over the padded mask, ranked by (-count, y, x), or
    by (-count, -tissue count, y, x); returns [(x, y, coverage)] of the k best (cycling)."""
    h, w = mask.shape
    padded = np.zeros((max(h, size), max(w, size)), bool)
    padded[:h, :w] = mask
    tpad = np.zeros_like(padded)
    if tissue is not None:
        tpad[:h, :w] = tissue
    ys = list(range(0, max(h, size) - size + 1, stride))
    xs = list(range(0, max(w, size) - size + 1, stride))
    if ys[-1] != max(h, size) - size:
        ys.append(max(h, size) - size)
    if xs[-1] != max(w, size) - size:
        xs.append(max(w, size) - size)
    windows = []
    for y in ys:
        for x in xs:
            count = int(padded[y:y + size, x:x + size].sum())
            windows.append((-count, -int(tpad[y:y + size, x:x + size].sum()), y, x))
    windows.sort()
    ranked = [(x, y, -c / size**2) for c, _, y, x in windows]
    return [ranked[i % len(ranked)] for i in range(k)], (xs, ys)


def _scan(rng, h, w, tissue=True):
    """Light-grey background with a darker textured block; uint8 H x W x 3."""
    img = np.full((h, w, 3), 220, np.uint8)
    img += rng.integers(0, 6, (h, w, 3), dtype=np.uint8)
    if tissue:
        y0, x0 = rng.integers(0, max(1, h // 2)), rng.integers(0, max(1, w // 2))
        img[y0:y0 + h // 3 + 1, x0:x0 + w // 3 + 1] = rng.integers(60, 180, (3,), dtype=np.uint8)
    return img


def _warnings(caplog) -> list[str]:
    """The warning lines the kit logger gave during the test."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _mask(rng, h, w, p=0.5, empty=False):
    m = np.zeros((h, w), np.uint8)
    if not empty:
        y0, x0 = rng.integers(0, h // 2 + 1), rng.integers(0, w // 2 + 1)
        block = rng.random((h // 2 + 1, w // 2 + 1)) < p
        m[y0:y0 + block.shape[0], x0:x0 + block.shape[1]] = block[: h - y0, : w - x0] * 255
    return m


def _write_dataset(root, n_train=5, n_test=3, seed=0, sizes=None, empty=()):
    """A tiny dataset in the challenge layout; ``empty`` names get an all-zero mask."""
    rng = np.random.default_rng(seed)
    labels = []
    for split, n in (("train", n_train), ("test", n_test)):
        folder = root / f"{split}_data"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = (sizes or {}).get((split, i), (40 + 7 * i, 56 + 5 * i))
            name = f"img_{i:04d}.png"
            Image.fromarray(_scan(rng, h, w)).save(folder / name)
            mask = _mask(rng, h, w, empty=(split, name) in empty)
            Image.fromarray(mask).save(folder / f"mask_{i:04d}.png")
            if split == "train":
                labels.append((name, CLASSES[i % 4]))
    pd.DataFrame(labels, columns=["sample_index", "label"]).to_csv(root / "train_labels.csv",
                                                                   index=False)
    return root


def _write_outliers(paths, rows=()):
    paths.folds_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(list(rows), columns=["sample_index", "reason", "score"]).to_csv(
        paths.outliers_csv, index=False)


@pytest.fixture
def patches_ds(tmp_path):
    root = _write_dataset(tmp_path / "data", sizes={("train", 4): (10, 30)},
                          empty={("train", "img_0003.png")})
    paths = Paths.from_root(tmp_path / "work")
    _write_outliers(paths, [("img_0001.png", "green", 0.9)])
    return root, paths


# --------------------------------------------------------------------------- windows
@pytest.mark.parametrize("h,w,size,stride", [
    (40, 56, 16, 8), (37, 41, 16, 5), (10, 30, 16, 8), (7, 5, 16, 4), (64, 64, 16, 16),
    (100, 33, 20, 7), (50, 50, 16, 24), (700, 420, 300, 260), (260, 64, 8, 300)])
def test_window_scores_and_ranking_match_brute_force(h, w, size, stride):
    rng = np.random.default_rng(h * 1000 + w)
    for p in (0.05, 0.5):
        mask = rng.random((h, w)) < p
        coverage, xs, ys = window_scores(mask, size, stride)
        ref, (rxs, rys) = _brute_force(mask, size, stride, k=5)
        assert xs.tolist() == rxs and ys.tolist() == rys
        assert coverage.shape == (len(ys), len(xs))
        best = select_windows(coverage, 5)
        iy, ix = np.divmod(best, len(xs))
        got = [(int(xs[b]), int(ys[a]), float(coverage[a, b])) for a, b in zip(iy, ix)]
        assert got == ref


def test_window_grid_covers_the_image_with_a_flush_last_window():
    assert window_starts(56, 16, 8).tolist() == [0, 8, 16, 24, 32, 40]
    assert window_starts(41, 16, 5).tolist() == [0, 5, 10, 15, 20, 25]
    assert window_starts(43, 16, 5).tolist() == [0, 5, 10, 15, 20, 25, 27]  # flush: 27 + 16 = 43
    assert window_starts(10, 16, 8).tolist() == [0]  # smaller than the window: padded


def test_ties_break_top_row_first_then_left_column():
    scores = np.array([[0.5, 1.0, 1.0],
                       [1.0, 0.0, 1.0]])
    assert select_windows(scores, 5).tolist() == [1, 2, 3, 5, 0]
    assert select_windows(np.zeros((3, 4)), 4).tolist() == [0, 1, 2, 3]
    then = np.array([[9.0, 0.0, 0.5],
                     [0.0, 7.0, 0.5]])
    assert select_windows(scores, 6, then).tolist() == [2, 5, 1, 3, 0, 4]


def test_sparse_mask_fills_with_tissue_windows_not_background():
    rng = np.random.default_rng(4)
    for _trial in range(6):
        h, w = rng.integers(40, 90, 2)
        img = np.full((h, w, 3), 225, np.uint8)
        for _ in range(3):  # dark tissue blocks
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            img[y:y + rng.integers(4, 20), x:x + rng.integers(4, 20)] = 100
        mask = np.zeros((h, w), bool)
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        mask[y:y + 3, x:x + 3] = True  # touches at most 4 windows of 16 px / stride 8
        xs, ys, cov, fallback, _ = pick_windows(mask, 16, 8, 8, img, tissue_threshold=200)
        ref, _ = _brute_force(mask, 16, 8, 8, tissue=tissue_mask(img, 200))
        assert not fallback
        assert list(zip(xs.tolist(), ys.tolist(), cov.tolist())) == ref
    # without the image the zeros keep the position order
    xs, ys, _, _, _ = pick_windows(mask, 16, 8, 8)
    ref, _ = _brute_force(mask, 16, 8, 8)
    assert list(zip(xs.tolist(), ys.tolist())) == [(x, y) for x, y, _ in ref]


def test_fewer_windows_than_k_repeat_the_ranking():
    scores = np.array([[0.2, 0.9]])
    assert select_windows(scores, 5).tolist() == [1, 0, 1, 0, 1]


# --------------------------------------------------------------------------- one image
def test_empty_mask_falls_back_to_tissue():
    rng = np.random.default_rng(1)
    img = np.full((64, 96, 3), 225, np.uint8)
    img[40:56, 64:80] = (120, 60, 150)  # the only tissue
    xs, ys, cov, fallback, region = pick_windows(np.zeros((64, 96), bool), 16, 8, 3, img,
                                                 tissue_threshold=200)
    assert fallback and (region == 0).all()
    assert (xs[0], ys[0], cov[0]) == (64, 40, 1.0)
    assert np.array_equal(cut_windows(img, xs, ys, 16)[0], img[40:56, 64:80])
    assert not pick_windows(_mask(rng, 64, 96) > 0, 16, 8, 3)[3]


def test_small_image_is_padded_and_pil_crops_equal_array_crops():
    rng = np.random.default_rng(2)
    img = _scan(rng, 10, 30)
    mask = _mask(rng, 10, 30) > 0
    xs, ys, *_ = pick_windows(mask, 16, 8, 4, img)
    patches = cut_windows(img, xs, ys, 16, pad_value=255)
    assert patches.shape == (4, 16, 16, 3) and patches.dtype == np.uint8
    for p, x, y in zip(patches, xs, ys):
        assert y == 0
        assert np.array_equal(p[:10, : min(16, 30 - x)], img[:, x:x + 16])
        assert (p[10:] == 255).all()
    pil = Image.fromarray(img)
    pil_xs, pil_ys, *_ = pick_windows(mask, 16, 8, 4, pil)
    assert np.array_equal(pil_xs, xs) and np.array_equal(pil_ys, ys)
    assert np.array_equal(cut_windows(pil, xs, ys, 16, pad_value=255), patches)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_non_rgb_images_are_cropped_like_read_image(tmp_path, mode):
    rng = np.random.default_rng(3)
    img = Image.fromarray(_scan(rng, 40, 50)).convert(mode)
    path, mask_path = tmp_path / "img.png", tmp_path / "mask.png"
    img.save(path)
    Image.fromarray(_mask(rng, 40, 50)).save(mask_path)
    cfg = load_config("patches", {"size": 16, "stride": 8, "top_k": 3})
    patches, rows, _ = extract_file((path, mask_path, cfg))
    full = read_image(path)
    assert len(rows) == 3 and not rows[0]["fallback"]
    for p, r in zip(patches, rows):
        assert np.array_equal(p, full[r["y"]:r["y"] + 16, r["x"]:r["x"] + 16])


# --------------------------------------------------------------------------- cache
def test_run_patches_writes_consistent_cache(patches_ds, caplog):
    root, paths = patches_ds
    sets = build(root, paths, CFG)
    train, test = sets["train"], sets["test"]
    assert isinstance(train.array, np.memmap)
    assert train.array.dtype == np.uint8 and train.array.shape == (4, 3, 16, 16, 3)
    assert test.array.shape == (3, 3, 16, 16, 3)
    # the outlier is left out of train; every test image is kept, unlabelled
    assert train.samples["sample_index"].tolist() == ["img_0000.png", "img_0002.png",
                                                      "img_0003.png", "img_0004.png"]
    assert train.samples["label"].tolist() == ["Luminal A", "HER2(+)", "Triple negative",
                                               "Luminal A"]
    assert (test.samples["label"] == "").all()
    assert train.samples["fallback"].tolist() == [False, False, True, False]
    assert "img_0003.png" in " ".join(_warnings(caplog))  # the fallback is reported
    for split, ps in sets.items():
        out = paths.patches_dir(split, 16)
        assert {p.name for p in out.iterdir()} == {"patches.npy", "samples.csv", "index.csv",
                                                   "meta.json", "config.yaml"}
        assert json.loads((out / "meta.json").read_text())["key"] == ps.key
        assert len(ps.index) == ps.array.shape[0] * ps.array.shape[1]
        for i, name in enumerate(ps.samples["sample_index"]):
            image = read_image(root / f"{split}_data" / name)
            mask = read_mask(root / f"{split}_data" / name.replace("img_", "mask_"))
            rows = ps.index[ps.index["sample_index"] == name].sort_values("patch")
            assert rows["patch"].tolist() == [0, 1, 2]
            assert rows["coverage"].is_monotonic_decreasing
            for r in rows.itertuples():
                h, w = image[r.y:r.y + 16, r.x:r.x + 16].shape[:2]
                assert np.array_equal(ps.array[i, r.patch, :h, :w],
                                      image[r.y:r.y + 16, r.x:r.x + 16])
                if not ps.samples["fallback"][i]:
                    assert r.coverage == mask[r.y:r.y + 16, r.x:r.x + 16].sum() / 256


def test_rerun_is_a_cache_hit_and_changes_rebuild(patches_ds, capsys):
    root, paths = patches_ds
    npy = paths.patches_dir("train", 16) / "patches.npy"
    test_npy = paths.patches_dir("test", 16) / "patches.npy"
    first = build(root, paths, CFG)
    stamp, test_stamp = npy.stat().st_mtime_ns, test_npy.stat().st_mtime_ns
    capsys.readouterr()

    again = build(root, paths, CFG)
    out = capsys.readouterr().out
    assert out.count("cache hit") == 2
    assert npy.stat().st_mtime_ns == stamp and again["train"].key == first["train"].key

    # one changed mask file: that split rebuilds, the other stays cached
    mask_path = root / "train_data" / "mask_0000.png"
    m = np.asarray(Image.open(mask_path)).copy()
    m[:] = 0
    m[-16:, -16:] = 255
    Image.fromarray(m).save(mask_path)
    changed = build(root, paths, CFG)
    out = capsys.readouterr().out
    assert "patches train: built" in out and "patches test: cache hit" in out
    assert changed["train"].key != first["train"].key
    assert test_npy.stat().st_mtime_ns == test_stamp
    row = changed["train"].index.iloc[0]
    h, w = m.shape
    assert (row.x, row.y, row.coverage) == (w - 16, h - 16, 1.0)

    # another top_k: rebuilt with the new shape
    bigger = build(root, paths, {**CFG, "top_k": 5})
    assert bigger["train"].array.shape[1] == 5 and bigger["test"].array.shape[1] == 5
    assert "cache hit" not in capsys.readouterr().out

    # another stride (same array shape): rebuilt too, under a new key
    strided = build(root, paths, {**CFG, "top_k": 5, "stride": 5})
    assert "cache hit" not in capsys.readouterr().out
    assert strided["train"].key != bigger["train"].key

    # another clean list (outlier dropped from outliers.csv): train rebuilds with 5 images
    _write_outliers(paths)
    more = build(root, paths, {**CFG, "top_k": 5, "stride": 5}, splits=("train",))
    assert more["train"].array.shape[0] == 5


def test_parallel_workers_write_the_same_bytes(patches_ds, tmp_path):
    root, paths = patches_ds
    build(root, paths, CFG, splits=("train",))
    other = Paths.from_root(tmp_path / "work2")
    _write_outliers(other, [("img_0001.png", "green", 0.9)])
    build(root, other, {**CFG, "workers": 2}, splits=("train",))
    for name in ("patches.npy", "samples.csv", "index.csv"):
        a = (paths.patches_dir("train", 16) / name).read_bytes()
        b = (other.patches_dir("train", 16) / name).read_bytes()
        assert a == b, name
    keys = [json.loads((p.patches_dir("train", 16) / "meta.json").read_text())["key"]
            for p in (paths, other)]
    assert keys[0] == keys[1]  # the worker count does not change the patches


def test_missing_cache_and_missing_clean_are_kit_errors(patches_ds, tmp_path):
    root, _ = patches_ds
    empty = Paths.from_root(tmp_path / "nowhere")
    with pytest.raises(KitError, match=r"no patch cache under .*run ./run.sh patches$"):
        load_patches(empty, "train")
    with pytest.raises(KitError, match="run ./run.sh clean first"):
        build(root, empty, CFG, splits=("train",))


def test_bad_parameters_are_refused(patches_ds):
    root, paths = patches_ds
    with pytest.raises(KitError, match="patches: top_k = 0 is not allowed: an integer >= 1"):
        build(root, paths, {**CFG, "top_k": 0})
    with pytest.raises(KitError, match="unknown key 'topk'"):
        build(root, paths, {"topk": 3})


# --------------------------------------------------------------------------- CLI
def test_patches_command_builds_and_reuses(patches_ds, capsys):
    root, paths = patches_ds
    argv = ["patches", "--data", str(root), "--workdir", str(paths.root), "--size", "16",
            "--stride", "8", "--top-k", "2", "--workers", "1"]
    assert main(argv) == 0
    assert load_patches(paths, "test").array.shape == (3, 2, 16, 16, 3)
    assert ("train 4 images x 2 patches of 16 px (top_k), 1 tissue fallback"
            in capsys.readouterr().out)
    assert main(argv) == 0
    assert capsys.readouterr().out.count("cache hit") == 2


def test_patches_command_without_clean_exits_2(tmp_path, capsys):
    root = _write_dataset(tmp_path / "data", n_train=2, n_test=1)
    assert main(["patches", "--data", str(root), "--workdir", str(tmp_path / "w")]) == 2
    assert "run ./run.sh clean first" in capsys.readouterr().err


def test_bench_dispatcher_reports_a_missing_module(monkeypatch, capsys):
    from kit.commands import bench

    monkeypatch.setitem(bench.BENCHES, "nosuch", "a benchmark nobody wrote")
    assert main(["bench", "nosuch"]) == 2
    assert "kit/bench/nosuch.py does not exist" in capsys.readouterr().err
    assert main(["bench"]) == 2
    assert "say what to benchmark" in capsys.readouterr().err


def test_bench_patches_times_both_passes(tmp_path, capsys):
    argv = ["bench", "patches", "--generator", "plain", "--n-train", "3", "--n-test", "1",
            "--short-side", "48", "--long-side-max", "120", "--repeat", "1", "--workers", "1",
            "--size", "16", "--stride", "8", "--top-k", "2", "--workdir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ratio extraction / decode-only" in out and "peak memory" in out
    result = json.loads((tmp_path / "runs" / "bench" / "patches.json").read_text())
    assert result["images"] == 4 and result["workers"] == 1
    assert result["ratio"] == pytest.approx(result["extraction"]["wall"]
                                            / result["decode_only"]["wall"])
    assert set(result["extraction"]["split"]) == {"decode", "score", "crop", "stain", "write"}
    patches = np.load(tmp_path / "runs" / "bench" / "patches" / "patches.npy")
    assert patches.shape == (4, 2, 16, 16, 3)


# --------------------------------------------------------------------------- stain normalisation
def _he_dataset(root, stains, n=3, seed=0, uptake=(1.0, 1.0)):
    """Train and test scans of H&E-like tissue rendered through ``stains`` (2 x 3) with stain
    ``uptake`` factors, each with a mask over its tissue block; the same tissue for the same
    seed whatever the staining."""
    rng = np.random.default_rng(seed)
    labels = []
    for split in ("train", "test"):
        folder = root / f"{split}_data"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            conc = np.zeros((48, 64, 2))
            conc[8:40, 8:56, 0] = rng.gamma(1.5, 0.15, (32, 48))
            conc[8:40, 8:56, 1] = rng.gamma(2.0, 0.4, (32, 48))
            nuclei = rng.random((32, 48)) < 0.25
            conc[8:40, 8:56, 0][nuclei] += rng.uniform(0.6, 1.6, nuclei.sum())
            od = (conc * np.asarray(uptake)) @ stains
            img = np.clip(240 * np.exp(-od), 0, 255).round().astype(np.uint8)
            Image.fromarray(img).save(folder / f"img_{i:04d}.png")
            mask = np.zeros((48, 64), np.uint8)
            mask[8:40, 8:56] = 255
            Image.fromarray(mask).save(folder / f"mask_{i:04d}.png")
            if split == "train":
                labels.append((f"img_{i:04d}.png", CLASSES[i % 4]))
    pd.DataFrame(labels, columns=["sample_index", "label"]).to_csv(root / "train_labels.csv",
                                                                   index=False)
    return root


STANDARD_HE = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
DARK_HE = np.array([[0.78, 0.55, 0.28], [0.09, 0.97, 0.21]])
MACENKO = {"stain_norm": {"method": "macenko"}}


def test_stain_norm_off_keeps_the_cache_key_of_older_caches():
    from kit.config import load_config
    from kit.data.patches import _key_cfg

    cfg = load_config("patches")
    assert cfg["stain_norm"]["method"] == "none"
    assert "stain_norm" not in _key_cfg(cfg)  # off: caches built before it existed stay valid
    on = load_config("patches", MACENKO)
    assert _key_cfg(on)["stain_norm"]["method"] == "macenko"


def test_stain_norm_brings_two_labs_together_and_rebuilds_the_cache(tmp_path, capsys):
    cfg = {"size": 16, "stride": 16, "top_k": 4, "workers": 1}
    sets = {}
    for name, stains, uptake in (("std", STANDARD_HE, (1, 1)), ("dark", DARK_HE, (1.3, 0.8))):
        root = _he_dataset(tmp_path / name, stains, uptake=uptake)
        paths = Paths.from_root(tmp_path / f"work_{name}")
        _write_outliers(paths)
        plain = build(root, paths, cfg)
        normed = build(root, paths, {**cfg, **MACENKO})
        out = capsys.readouterr().out
        assert out.count("built") == 4 and "cache hit" not in out  # a new key: rebuilt
        assert normed["train"].key != plain["train"].key
        assert normed["train"].meta["stain_norm"] == {"method": "macenko", "n_skipped": 0,
                                                      "skipped": []}
        assert "stain_norm" not in plain["train"].meta
        # same windows, other colours
        assert plain["train"].index.equals(normed["train"].index)
        sets[name] = (np.asarray(plain["train"].array), np.asarray(normed["train"].array))
        again = build(root, paths, {**cfg, **MACENKO})
        assert capsys.readouterr().out.count("cache hit") == 2
        assert again["train"].key == normed["train"].key
        other = build(root, paths, {**cfg, "stain_norm": {"method": "macenko", "alpha": 2}},
                            splits=("train",))
        assert other["train"].key != normed["train"].key
        capsys.readouterr()
    (std_plain, std_norm), (dark_plain, dark_norm) = sets["std"], sets["dark"]
    before = np.abs(std_plain.astype(int) - dark_plain).mean()  # ~11 grey levels
    after = np.abs(std_norm.astype(int) - dark_norm).mean()  # ~0.5
    assert before > 8 and after < before / 5


def test_stain_norm_skips_images_without_tissue(patches_ds, caplog):
    root, paths = patches_ds  # flat grey blocks: 1-2 % of the pixels pass the OD threshold
    sets = build(root, paths, {**CFG, "stain_norm": {"method": "macenko",
                                                           "min_tissue": 0.9}})
    skipped = sets["train"].meta["stain_norm"]["skipped"]
    assert sorted(skipped) == sorted(sets["train"].samples.sample_index)
    assert "too little tissue for stain normalisation" in " ".join(_warnings(caplog))
    # left as they are: the same bytes as without normalisation
    plain = Paths.from_root(paths.root.parent / "plain")
    _write_outliers(plain, [("img_0001.png", "green", 0.9)])
    ref = build(root, plain, CFG, splits=("train",))["train"]
    assert np.array_equal(np.asarray(ref.array), np.asarray(sets["train"].array))


@pytest.mark.parametrize("bad,key", [({"method": "vahadane"}, "stain_norm.method"),
                                     ({"beta": -1}, "stain_norm.beta"),
                                     ({"reference": "no/such.png"}, "stain_norm.reference")])
def test_bad_stain_settings_are_refused_before_any_work(patches_ds, bad, key):
    root, paths = patches_ds
    with pytest.raises(KitError, match=key):
        build(root, paths, {**CFG, "stain_norm": {"method": "macenko", **bad}})
    assert not paths.patches_root.exists()


# --------------------------------------------------------------------------- tasks without masks
def test_without_a_mask_the_windows_are_the_most_tissued_ones(tmp_path):
    rng = np.random.default_rng(5)
    img = _scan(rng, 40, 56)
    path = tmp_path / "img.png"
    Image.fromarray(img).save(path)
    cfg = load_config("patches", {"size": 16, "stride": 8, "top_k": 3})
    patches, rows, _ = extract_file((path, None, cfg))
    xs, ys, cov, fallback, _ = pick_windows(np.zeros((40, 56), bool), 16, 8, 3, img, 200)
    assert fallback and all(r["fallback"] for r in rows)
    assert [(r["x"], r["y"]) for r in rows] == list(zip(xs.tolist(), ys.tolist()))
    tissue = tissue_mask(img, 200)
    best = window_scores(tissue, 16, 8)[0].max()
    assert rows[0]["coverage"] == pytest.approx(best) and best > 0
    assert np.array_equal(patches[0], img[ys[0]:ys[0] + 16, xs[0]:xs[0] + 16])


def test_cache_key_hashes_masks_only_where_there_are_some(tmp_path):
    """AN2DL's key is the one it always was; a sample without a mask hashes its image alone."""
    import json

    from kit.data.dataset import Sample
    from kit.data.patches import CODE_VERSION, _key_cfg, cache_key
    from kit.utils import sha256_file, sha256_text

    for value, name in enumerate(("a.png", "ma.png", "b.png")):
        Image.fromarray(np.full((4, 4, 3), 40 * value, np.uint8)).save(tmp_path / name)
    cfg = load_config("patches")
    paired = [Sample("a.png", tmp_path / "a.png", tmp_path / "ma.png", "x")]
    items = [["a.png", "x", sha256_file(tmp_path / "a.png"), sha256_file(tmp_path / "ma.png")]]
    old = sha256_text(json.dumps({"version": CODE_VERSION, "split": "train", "cfg": _key_cfg(cfg),
                                  "samples": items}, sort_keys=True))
    assert cache_key(paired, cfg, "train") == old
    alone = [Sample("a.png", tmp_path / "a.png", None, "x")]
    key = cache_key(alone, cfg, "train")
    assert key != old and key == sha256_text(json.dumps(
        {"version": CODE_VERSION, "split": "train", "cfg": _key_cfg(cfg),
         "samples": [items[0][:3]]}, sort_keys=True))
    other = [Sample("a.png", tmp_path / "b.png", None, "x")]
    assert cache_key(other, cfg, "train") != key  # the image still counts
