"""Junk detection on generated data: planted junk found, nothing else; files and overrides."""
from __future__ import annotations

import base64
import io
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kit import clean, demo
from kit.cli import main
from kit.config import load_config
from kit.data import load_dataset
from kit.paths import Paths
from kit.utils import KitError


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    """A demo dataset (3 cartoons, 4 green, 2 green test images) and one clean run on it."""
    base = tmp_path_factory.mktemp("clean")
    root = demo.generate(base / "data", n_train=40, n_test=10, short_side=80, seed=11,
                         n_cartoon=3, n_green=4, n_test_green=2)
    paths = Paths.from_root(base / "work")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outliers = clean.run_clean(root, paths)
    junk = pd.read_csv(root / demo.JUNK_CSV, keep_default_na=False)
    return root, paths, outliers, junk, caught


def test_every_planted_junk_image_is_found_and_nothing_else(cleaned):
    _, _, outliers, junk, _ = cleaned
    truth = junk[junk.split == "train"]
    assert dict(zip(outliers.sample_index, outliers.reason)) == dict(zip(truth.sample_index, truth.kind))


def test_real_image_of_each_duplicate_mask_pair_is_kept(cleaned):
    root, paths, outliers, junk, _ = cleaned
    cartoons = junk[junk.kind == "cartoon"]
    kept = {s.sample_index for s in clean.clean_train_samples(load_dataset(root), paths)}
    for row in cartoons.itertuples():
        assert row.sample_index not in kept and row.mask_of in kept
    assert len(kept) == 40 - len(junk[junk.split == "train"])


@pytest.mark.filterwarnings("ignore:.*look like junk")
def test_duplicate_masks_alone_catch_the_cartoons(cleaned, tmp_path):
    """With the stand-alone colour rule out of reach, the mask pairs still find every cartoon."""
    root, _, outliers, junk, _ = cleaned
    strict_off = clean.run_clean(root, Paths.from_root(tmp_path), {"cartoon": {"strict": 1.01}})
    cartoons = set(junk[junk.kind == "cartoon"].sample_index)
    assert set(strict_off[strict_off.reason == "cartoon"].sample_index) == cartoons
    no_pairs = clean.run_clean(root, Paths.from_root(tmp_path),
                               {"cartoon": {"strict": 1.01, "paired": 1.01}})
    assert set(no_pairs.reason) == {"green"}  # so the pairing, not luck, did it


def test_outliers_csv_format(cleaned):
    _, paths, outliers, _, _ = cleaned
    text = paths.outliers_csv.read_text()
    assert text.splitlines()[0] == "sample_index,reason,score"
    df = clean.load_outliers(paths)
    assert list(df.sample_index) == sorted(df.sample_index)
    assert set(df.reason) == {"cartoon", "green"}
    assert df.score.notna().all() and (df.score > 0).all()
    assert (paths.clean_dir / "config.yaml").exists()


def test_review_page_inlines_flagged_and_borderline_thumbnails(cleaned):
    _, paths, outliers, _, _ = cleaned
    page = (paths.clean_dir / "review.html").read_text()
    for name in outliers.sample_index:
        assert f"train/{name}" in page
    images = re.findall(r"src='data:image/jpeg;base64,([^']+)'", page)
    # flagged + up to 5 borderline cartoons + both members of each duplicate pair + test reports
    assert len(images) >= len(outliers) + 5
    with Image.open(io.BytesIO(base64.b64decode(images[0]))) as im:
        assert max(im.size) <= 320 and im.mode == "RGB"
    assert "Borderline cartoon" in page and "Borderline green" in page


def test_suspicious_test_images_are_reported_not_dropped(cleaned):
    root, paths, _, junk, caught = cleaned
    report = pd.read_csv(paths.clean_dir / "test_suspicious.csv")
    planted = junk[(junk.split == "test") & (junk.kind == "green")]
    assert sorted(report.sample_index) == sorted(planted.sample_index) and len(planted) == 2
    assert set(report.reason) == {"green"}
    assert any("test image(s) look like junk" in str(w.message) for w in caught)
    assert len(load_dataset(root).test) == 10  # nothing removed from the test split


def test_overrides_win_over_the_detector(cleaned):
    root, paths, outliers, junk, _ = cleaned
    cartoon = outliers[outliers.reason == "cartoon"].sample_index.iloc[0]
    normal = sorted(set(f"img_{i:04d}.png" for i in range(40)) - set(junk.sample_index))[0]
    paths.overrides_csv.write_text(f"sample_index,action\n{cartoon},keep\n{normal},drop\n")
    try:
        kept = {s.sample_index for s in clean.clean_train_samples(load_dataset(root), paths)}
    finally:
        paths.overrides_csv.unlink()
    assert cartoon in kept and normal not in kept
    assert len(kept) == 40 - len(outliers)


@pytest.mark.parametrize("text, message", [
    ("name,what\nimg_0000.png,keep\n", "missing column"),
    ("sample_index,action\nimg_0000.png,maybe\n", "keep or drop"),
    ("sample_index,action\nimg_9999.png,drop\n", "not in the training set"),
    ("sample_index,action\nimg_0001.png,drop\nimg_0001.png,keep\n", "more than once"),
])
def test_malformed_overrides_name_the_file_and_the_fix(cleaned, text, message):
    root, paths, _, _, _ = cleaned
    paths.overrides_csv.write_text(text)
    try:
        with pytest.raises(KitError, match=message) as err:
            clean.clean_train_samples(load_dataset(root), paths)
    finally:
        paths.overrides_csv.unlink()
    assert "overrides.csv" in str(err.value)


def test_missing_outliers_file_says_to_run_clean(tmp_path, cleaned):
    root = cleaned[0]
    with pytest.raises(KitError, match=r"run \./run\.sh clean first"):
        clean.clean_train_samples(load_dataset(root), Paths.from_root(tmp_path))


def _feats(rows):
    cols = ["split", "sample_index", "green", "cartoon", "mask_sha256"]
    return pd.DataFrame(rows, columns=cols)


def test_duplicate_masks_decide_which_member_is_the_cartoon():
    cfg = load_config("clean")
    feats = _feats([
        ("train", "real_a.png", 0.0, 0.05, "m1"), ("train", "toon_a.png", 0.0, 0.40, "m1"),
        ("train", "loud.png", 0.0, 0.70, "m2"),     # cartoon-like on its own
        ("train", "mild.png", 0.0, 0.40, "m3"),     # same score, no duplicate: kept
        ("train", "twin1.png", 0.0, 0.10, "m4"), ("train", "twin2.png", 0.0, 0.12, "m4"),
        ("train", "stain.png", 0.01, 0.03, "m5"),
        ("train", "both.png", 0.05, 0.90, "m6"),    # bright-green cartoon: one reason only
        ("test", "t_dup.png", 0.0, 0.50, "m1"),     # a test image reusing a training mask
    ])
    out = clean.decide(feats, cfg).set_index("sample_index")["reason"].to_dict()
    assert out == {"real_a.png": "", "toon_a.png": "cartoon", "loud.png": "cartoon", "mild.png": "",
                   "twin1.png": "", "twin2.png": "", "stain.png": "green", "both.png": "cartoon",
                   "t_dup.png": "cartoon"}
    # with pairing off (paired = strict), the mild cartoon of a pair escapes: pairing matters
    cfg["cartoon"]["paired"] = 0.6
    assert clean.decide(feats, cfg).set_index("sample_index").loc["toon_a.png", "reason"] == ""


def test_image_features_accept_non_rgb_inputs(tmp_path):
    cfg = load_config("clean")
    rgb = np.full((64, 96, 3), 215, np.uint8)
    rgb[20:30, 20:60] = (30, 210, 40)  # green stain
    mask = tmp_path / "mask.png"
    Image.fromarray(np.zeros((64, 96), np.uint8)).save(mask)
    for mode in ("RGB", "RGBA", "P"):
        path = tmp_path / f"img_{mode}.png"
        Image.fromarray(rgb).convert(mode).save(path)
        f = clean.image_features((str(path), str(mask)), cfg)
        assert f["green"] == pytest.approx(400 / (64 * 96), rel=0.05), mode
    grey16 = tmp_path / "img_16.png"
    Image.fromarray((np.full((64, 96), 50000, np.uint16))).save(grey16)
    assert clean.image_features((str(grey16), str(mask)), cfg)["green"] == 0


def test_real_scale_counts(tmp_path):
    """v2 proportions: 691 training images with 60 cartoons and 50 green -> exactly those."""
    root = demo.generate(tmp_path / "data", n_train=691, n_test=4, short_side=64, seed=2,
                         n_cartoon=60, n_green=50, long_side_max=192, n_test_green=0)
    outliers = clean.run_clean(root, Paths.from_root(tmp_path / "work"), {"workers": 2})
    assert outliers.reason.value_counts().to_dict() == {"cartoon": 60, "green": 50}
    junk = pd.read_csv(root / demo.JUNK_CSV)
    assert dict(zip(outliers.sample_index, outliers.reason)) == dict(zip(junk.sample_index, junk.kind))


def test_command_prints_counts_and_review_path(cleaned, tmp_path, capsys):
    root = cleaned[0]
    code = main(["clean", "--data", str(root), "--workdir", str(tmp_path), "--green-share", "0.5"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"cartoon\s+3", out) and re.search(r"green\s+0", out)  # 0.5: no stain that big
    assert "review.html" in out
    assert main(["clean", "--data", str(tmp_path / "nowhere"), "--workdir", str(tmp_path)]) == 2
