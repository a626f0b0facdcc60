"""Junk detection on generated data: planted junk found, nothing else; files and overrides."""
from __future__ import annotations

import base64
import io
import logging
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kit.cli import main
from kit.config import load_config
from kit.data import clean, demo, neardup
from kit.data.dataset import load_dataset
from kit.log import capture
from kit.paths import Paths
from kit.utils import KitError


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    """A demo dataset (3 cartoons, 4 green, 2 green test images) and one clean run on it."""
    base = tmp_path_factory.mktemp("clean")
    root = demo.generate(base / "data", n_train=40, n_test=10, short_side=80, seed=11,
                         n_cartoon=3, n_green=4, n_test_green=2)
    paths = Paths.from_root(base / "work")
    with capture() as lines:  # the kit logger's lines, warnings included
        outliers = clean.run_clean(paths, root, load_config("clean"))
    junk = pd.read_csv(root / demo.JUNK_CSV, keep_default_na=False)
    return root, paths, outliers, junk, [line for line in lines if line.startswith("warning:")]


def test_every_planted_junk_image_is_found_and_nothing_else(cleaned):
    _, _, outliers, junk, _ = cleaned
    truth = junk[junk.split == "train"]
    assert (dict(zip(outliers.sample_index, outliers.reason))
            == dict(zip(truth.sample_index, truth.kind)))


def test_real_image_of_each_duplicate_mask_pair_is_kept(cleaned):
    root, paths, outliers, junk, _ = cleaned
    cartoons = junk[junk.kind == "cartoon"]
    kept = {s.sample_index for s in clean.clean_train_samples(load_dataset(root), paths)}
    for row in cartoons.itertuples():
        assert row.sample_index not in kept and row.mask_of in kept
    assert len(kept) == 40 - len(junk[junk.split == "train"])


def test_duplicate_masks_alone_catch_the_cartoons(cleaned, tmp_path):
    """With the stand-alone colour rule out of reach, the mask pairs still find every cartoon."""
    root, _, outliers, junk, _ = cleaned
    strict_off = clean.run_clean(Paths.from_root(tmp_path), root,
                                 load_config("clean", {"cartoon": {"strict": 1.01}}))
    cartoons = set(junk[junk.kind == "cartoon"].sample_index)
    assert set(strict_off[strict_off.reason == "cartoon"].sample_index) == cartoons
    no_pairs = clean.run_clean(Paths.from_root(tmp_path), root,
                               load_config("clean", {"cartoon": {"strict": 1.01, "paired": 1.01}}))
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
    root, paths, _, junk, warned = cleaned
    report = pd.read_csv(paths.clean_dir / "test_suspicious.csv")
    planted = junk[(junk.split == "test") & (junk.kind == "green")]
    assert sorted(report.sample_index) == sorted(planted.sample_index) and len(planted) == 2
    assert set(report.reason) == {"green"}
    assert any("test image(s) look like junk" in line for line in warned)
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
    """v2 proportions: 691 training images with 60 cartoons and 50 green -> exactly those.

    Also the near-duplicate false-positive check at real scale (238,000 pairs): the only
    groups are the 60 cartoon/host pairs, matched by their identical masks.
    """
    root = demo.generate(tmp_path / "data", n_train=691, n_test=4, short_side=64, seed=2,
                         n_cartoon=60, n_green=50, long_side_max=192, n_test_green=0)
    paths = Paths.from_root(tmp_path / "work")
    outliers = clean.run_clean(paths, root, load_config("clean", {"workers": 2}))
    assert outliers.reason.value_counts().to_dict() == {"cartoon": 60, "green": 50}
    junk = pd.read_csv(root / demo.JUNK_CSV)
    assert (dict(zip(outliers.sample_index, outliers.reason))
            == dict(zip(junk.sample_index, junk.kind)))
    near = pd.read_csv(neardup.near_duplicates_csv(paths))
    assert _pairs(near) == _cartoon_pairs(junk)


# --- near-duplicates -----------------------------------------------------------------------

def _pairs(near: pd.DataFrame) -> set[frozenset]:
    return {frozenset(f"{r.split}/{r.sample_index}" for r in g.itertuples())
            for _, g in near.groupby("group")}


def _cartoon_pairs(junk: pd.DataFrame) -> set[frozenset]:
    return {frozenset({f"train/{r.sample_index}", f"train/{r.mask_of}"})
            for r in junk[junk.kind == "cartoon"].itertuples()}


def test_near_duplicate_file_holds_only_the_shared_mask_pairs(cleaned):
    root, paths, _, junk, warned = cleaned
    near = pd.read_csv(neardup.near_duplicates_csv(paths))
    assert list(near.columns) == neardup.COLUMNS
    assert _pairs(near) == _cartoon_pairs(junk) and len(junk[junk.kind == "cartoon"]) == 3
    assert set(near.kind) == {"mask"} and (near.distance == 0).all()
    assert sorted(near.group.unique()) == [1, 2, 3]
    page = (paths.clean_dir / "review.html").read_text()
    assert "Near-duplicate groups (3;" in page and "3 group(s) are images sharing one mask" in page
    assert not any("near-duplicate group" in line for line in warned)


def _resized(path, factor, resample):
    with Image.open(path) as im:
        return im.resize((round(im.width * factor), round(im.height * factor)), resample)


def _jpeg_round_trip(im: Image.Image, quality: int = 60) -> Image.Image:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def planted(cleaned, tmp_path_factory):
    """The demo dataset with three planted near-duplicate pairs (none byte-identical).

    (a, b): b is a rescaled, JPEG-recompressed, brightened copy of a, mask rescaled too;
    (c, d): d is c darkened, with a new mask of two rectangles (image match only);
    (e, f): f keeps its own image and gets e's mask rescaled to f's size (mask match only).
    """
    root, _, _, junk, _ = cleaned
    data = tmp_path_factory.mktemp("planted") / "data"
    shutil.copytree(root, data)
    busy = set(junk.sample_index) | set(junk.mask_of)
    free = [i for i in range(40) if f"img_{i:04d}.png" not in busy]
    a, b, c, d, e, f = free[:6]

    def img(i):
        return data / "train_data" / f"img_{i:04d}.png"

    def msk(i):
        return data / "train_data" / f"mask_{i:04d}.png"

    from PIL import ImageEnhance

    copy = _jpeg_round_trip(_resized(img(a), 0.8, Image.BILINEAR))
    ImageEnhance.Brightness(copy).enhance(1.1).save(img(b))
    _resized(msk(a), 0.8, Image.NEAREST).save(msk(b))
    with Image.open(img(c)) as im:
        ImageEnhance.Brightness(im.convert("RGB")).enhance(0.9).save(img(d))
        new = np.zeros((im.height, im.width), np.uint8)
    new[: im.height // 3, : im.width // 4] = 255
    new[im.height // 2:, im.width // 2: im.width * 3 // 4] = 255
    Image.fromarray(new).save(msk(d))
    with Image.open(img(f)) as im:
        size = im.size
    with Image.open(msk(e)) as m:
        m.resize(size, Image.NEAREST).save(msk(f))
    paths = Paths.from_root(data.parent / "work")
    clean.run_clean(paths, data, load_config("clean"))
    near = pd.read_csv(neardup.near_duplicates_csv(paths))

    def name(i):
        return f"train/img_{i:04d}.png"

    return data, paths, near, {"image": [(name(a), name(b)), (name(c), name(d))],
                               "mask": [(name(e), name(f))]}


def test_planted_near_duplicates_are_grouped_and_nothing_else(planted, cleaned):
    _, paths, near, truth = planted
    expected = _cartoon_pairs(cleaned[3]) | {frozenset(p) for ps in truth.values() for p in ps}
    assert _pairs(near) == expected
    rows = near.assign(key=near.split + "/" + near.sample_index).set_index("key")
    for kind, pairs in truth.items():
        for x, y in pairs:
            assert rows.loc[x, "kind"] == rows.loc[y, "kind"] == kind
            assert rows.loc[x, "nearest"] == y and rows.loc[y, "nearest"] == x
            assert 0 < rows.loc[x, "distance"] <= 24
    page = (paths.clean_dir / "review.html").read_text()
    assert page.count("<h3>Group ") == 3  # the planted pairs; the shared-mask pairs are above
    for x, _ in truth["image"]:
        assert f"near-duplicate group {rows.loc[x, 'group']}: image hash" in page


def test_planted_near_duplicates_share_a_fold(planted):
    from kit.data.folds import run_folds

    data, paths, _, truth = planted
    for seed in (0, 1, 2):
        folds = run_folds(paths, data, load_config("folds"), seed=seed,
                          force=True).set_index("sample_index").fold
        for pairs in truth.values():
            for x, y in pairs:
                assert folds[x.split("/")[1]] == folds[y.split("/")[1]], (seed, x, y)


def test_find_groups_chains_kinds_and_order():
    def h(bits):
        return f"{bits:016x}"

    table = pd.DataFrame({
        "split": ["train", "train", "train", "test", "train", "train", "train"],
        "sample_index": ["z.png", "y.png", "x.png", "a.png", "m.png", "n.png", "o.png"],
        "image_phash": [h(0), h(0b1), h(0b111), h(0b11), h(0xFF00), "", h(0xFFFF_0000)],
        "mask_phash": [h(0xF0), "", "", h(0xF0F0), h(0xFFFF), h(0xFFFE), ""],
    })
    cfg = {"image_distance": 1, "mask_distance": 1}
    near = neardup.find_groups(table, cfg)
    assert near.to_dict("records") == [
        # m-n through their masks (1 bit); an empty hash never matches
        {"group": 1, "split": "train", "sample_index": "m.png", "kind": "mask",
         "nearest": "train/n.png", "distance": 1},
        {"group": 1, "split": "train", "sample_index": "n.png", "kind": "mask",
         "nearest": "train/m.png", "distance": 1},
        # z-y, y-a, a-x: 1 bit each through the image hashes, one chain; train rows first
        {"group": 2, "split": "train", "sample_index": "x.png", "kind": "image",
         "nearest": "test/a.png", "distance": 1},
        {"group": 2, "split": "train", "sample_index": "y.png", "kind": "image",
         "nearest": "train/z.png", "distance": 1},
        {"group": 2, "split": "train", "sample_index": "z.png", "kind": "image",
         "nearest": "train/y.png", "distance": 1},
        {"group": 2, "split": "test", "sample_index": "a.png", "kind": "image",
         "nearest": "train/x.png", "distance": 1},
    ]
    assert neardup.find_groups(table, {"image_distance": -1, "mask_distance": -1}).empty
    only_masks = neardup.find_groups(table, {"image_distance": -1, "mask_distance": 1})
    assert set(only_masks.sample_index) == {"m.png", "n.png"}


def test_empty_and_flat_inputs_get_no_hash():
    assert neardup.mask_hash(np.zeros((64, 96), bool), 256, 16, 0.001) == ("", 0.0)
    full = neardup.mask_hash(np.ones((64, 96), bool), 256, 16, 0.001)
    assert full == ("", 1.0)
    blob = np.zeros((64, 96), bool)
    blob[10:30, 20:50] = True
    hexed, share = neardup.mask_hash(blob, 256, 16, 0.001)
    assert len(hexed) == 64 and share == pytest.approx(600 / (64 * 96))
    assert neardup.image_hash(Image.new("RGB", (96, 64), (210, 210, 215)), 16) == ""


def test_large_groups_are_warned_about(tmp_path, caplog):
    near = pd.DataFrame({"group": [1] * 6 + [2] * 2, "split": "train",
                         "sample_index": [f"img_{i:04d}.png" for i in range(8)], "kind": "image",
                         "nearest": "", "distance": 3})
    clean._warn_big_groups(near, 4, Paths.from_root(tmp_path))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert re.search(r"1 near-duplicate group\(s\) with more than 4 images \(largest: 6\)",
                     warned[0])


def test_command_prints_counts_and_review_path(cleaned, tmp_path, capsys):
    root = cleaned[0]
    code = main(["clean", "--data", str(root), "--workdir", str(tmp_path), "--green-share", "0.5"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"cartoon\s+3", out) and re.search(r"green\s+0", out)  # 0.5: no stain that big
    assert "review.html" in out
    assert "near-duplicate groups: 3 (6 training images" in out and "near_duplicates.csv" in out
    assert main(["clean", "--data", str(tmp_path / "nowhere"), "--workdir", str(tmp_path)]) == 2


def test_review_page_escapes_names_and_labels():
    """Names and labels come from the user's files: the template escapes them, in text and in
    the near-duplicate notes, and leaves no tag but its own."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 150)).save(buf, "JPEG")
    evil_name, evil_label = "img_<script>&x.png", "<script>alert('x')</script> & co"
    names = [evil_name, "img_0002.png", "img_0003.png"]
    feats = pd.DataFrame({"split": ["train", "train", "test"], "sample_index": names,
                          "label": [evil_label, "Luminal A", ""], "green": [0.5, 0.0, 0.0],
                          "colour": 0.1, "smooth": 0.1, "cartoon": 0.1,
                          "mask_sha256": ["a", "b", "c"], "thumb": [buf.getvalue()] * 3})
    cfg = load_config("clean")
    feats = clean.decide(feats, cfg)
    near = pd.DataFrame({"group": [1, 1], "split": "train", "sample_index": names[:2],
                         "kind": "image", "nearest": [names[1], evil_name], "distance": 3})
    overrides = pd.DataFrame({"sample_index": [evil_name], "action": ["keep"]})
    page = clean.review_html(feats, cfg, overrides, near)
    label = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; co"
    name = "img_&lt;script&gt;&amp;x.png"
    assert f"<b>train/{name}</b> {label}<br>green 0.5 · override: keep<br>" in page
    assert f"near-duplicate group 1: image hash 3 bits from {name}" in page
    assert "<script" not in page and not re.search(r"&(?!amp;|lt;|gt;|#39;)", page)
    assert page.count("<figure class='green'>") == 2  # flagged, and again in its group


# --- the task's junk detectors, data without masks -------------------------------------------

def test_only_the_tasks_detectors_flag_and_images_without_masks_pair_with_none():
    cfg = load_config("clean")
    feats = _feats([
        ("train", "real_a.png", 0.0, 0.05, "m1"), ("train", "toon_a.png", 0.0, 0.40, "m1"),
        ("train", "loud.png", 0.0, 0.70, "m2"), ("train", "stain.png", 0.01, 0.03, "m5"),
        # no masks: never a pair, even with the same (empty) hash; only `strict` flags them
        ("train", "n1.png", 0.0, 0.40, ""), ("train", "n2.png", 0.0, 0.05, ""),
        ("test", "n3.png", 0.0, 0.70, ""),
    ])
    both = clean.decide(feats, cfg).set_index("sample_index")
    assert both.reason.to_dict() == {"real_a.png": "", "toon_a.png": "cartoon",
                                     "loud.png": "cartoon", "stain.png": "green", "n1.png": "",
                                     "n2.png": "", "n3.png": "cartoon"}
    assert both.loc[["n1.png", "n2.png", "n3.png"], "group_size"].tolist() == [1, 1, 1]
    green = clean.decide(feats, cfg, ("green",)).set_index("sample_index").reason
    assert set(green[green != ""].index) == {"stain.png"}
    cartoon = clean.decide(feats, cfg, ("cartoon",)).set_index("sample_index").reason
    assert set(cartoon[cartoon != ""].index) == {"toon_a.png", "loud.png", "n3.png"}
    assert set(clean.decide(feats, cfg, ()).reason) == {""}


def _task_file(folder, **changes):
    """The built-in task with ``changes``, as ``folder/task.yaml`` (the data's own task)."""
    import yaml

    from kit.task import default_task

    (folder / "task.yaml").write_text(yaml.safe_dump({**default_task().to_dict(), **changes}))


def test_a_task_without_junk_detectors_flags_nothing_but_writes_every_file(cleaned, tmp_path,
                                                                           capsys):
    root = tmp_path / "data"
    shutil.copytree(cleaned[0], root)
    _task_file(root, junk=[])  # the same planted junk, but this task names no detector
    paths = Paths.from_root(tmp_path / "work")
    assert main(["clean", "--data", str(root), "--workdir", str(paths.root)]) == 0
    assert "no junk detector: task an2dl2526c2v2 lists junk: []" in capsys.readouterr().out
    assert paths.outliers_csv.read_text() == "sample_index,reason,score\n"
    page = (paths.clean_dir / "review.html").read_text()
    assert "no junk detector for this task" in page and "Borderline" not in page
    assert "Images sharing a mask file (3 groups" in page  # the mask pairs are still shown
    assert len(clean.clean_train_samples(load_dataset(root), paths)) == 40
    _task_file(root, junk=["green"])
    green = clean.run_clean(paths, root, load_config("clean"))
    assert set(green.reason) == {"green"} and len(green) == 4  # the 4 planted splats only


def test_without_masks_no_mask_hash_but_image_near_duplicates_still_group(tmp_path):
    from kit.data.task_synth import write_task_dataset

    root = write_task_dataset(tmp_path / "data", "csv", seed=2, n_train=12, n_test=3)
    # a re-encoded copy of one image under a new id: only the image hash can find it
    with Image.open(root / "train" / "case_0003.png") as im:
        im.convert("RGB").save(root / "train" / "case_0099.png", "PNG", compress_level=9)
    labels = pd.read_csv(root / "train.csv", dtype=str)
    copy = labels[labels.case == "case_0003"].assign(case="case_0099")
    pd.concat([labels, copy]).to_csv(root / "train.csv", index=False)
    paths = Paths.from_root(tmp_path / "work")
    outliers = clean.run_clean(paths, root, load_config("clean"))
    assert outliers.empty
    scores = pd.read_csv(paths.clean_dir / "scores.csv", keep_default_na=False)
    assert set(scores.mask_sha256) == {""} and set(scores.mask_phash) == {""}
    assert set(scores.mask_share) == {""}  # no mask: no share (NaN)
    near = pd.read_csv(neardup.near_duplicates_csv(paths))
    assert set(near.sample_index) == {"case_0003", "case_0099"} and set(near.kind) == {"image"}
    page = (paths.clean_dir / "review.html").read_text()
    assert "Group 1: 2 images" in page  # not hidden as "sharing one mask file"
