"""The demo generator: challenge layout, determinism, planted junk, class signal in the mask."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kit import CLASSES
from kit.data import demo
from kit.data.dataset import load_dataset, mask_groups, read_image, read_mask
from kit.utils import KitError


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "data"
    return demo.generate(root, n_train=36, n_test=8, short_side=64, seed=5)


def _junk(root):
    return pd.read_csv(root / demo.JUNK_CSV, keep_default_na=False)


def test_layout_validates_and_has_the_challenge_format(small):
    ds = load_dataset(small)  # the kit's own validator accepts it
    assert len(ds.train) == 36 and len(ds.test) == 8
    assert (small / "train_labels.csv").read_text().startswith("sample_index,label\nimg_0000.png,")
    assert [s.sample_index for s in ds.train] == [f"img_{i:04d}.png" for i in range(36)]
    assert {s.label for s in ds.train} <= set(CLASSES)
    for s in ds.train + ds.test:
        with Image.open(s.image) as im, Image.open(s.mask) as m:
            assert im.mode == "RGB" and m.mode == "L" and im.size == m.size
            short, long = sorted(im.size)
            assert short == 64 and 1.5 * 64 - 1 <= long <= 4 * 64 + 1
            values = np.unique(np.asarray(m))
        assert set(values.tolist()) == {0, 255}  # 1-4 regions: never empty, never full
    # both orientations occur
    assert len({read_mask(s.mask).shape[0] > read_mask(s.mask).shape[1] for s in ds.train}) == 2


def test_masks_lie_inside_the_tissue_on_a_grey_background(small):
    shares, in_mask = [], []
    for s in load_dataset(small).train[:16]:
        img = read_image(s.image).astype(int)
        if s.sample_index in set(_junk(small).sample_index):
            continue
        mask = read_mask(s.mask)
        saturation = img.max(2) - img.min(2)
        background = saturation < 15
        shares.append(background.mean())
        in_mask.append(mask.mean() / (1 - background.mean()))
        grey = img[background]
        assert 195 <= grey.mean() <= 232
        assert (saturation[mask] > 15).mean() > 0.97  # masked pixels are stained tissue
    assert min(shares) > 0.3 and np.mean(shares) > 0.5  # mostly background
    assert max(in_mask) < 0.97 and np.mean(in_mask) < 0.6  # regions, not whole strips


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path):
    a = demo.generate(tmp_path / "a", n_train=14, n_test=3, short_side=48, seed=1)
    b = demo.generate(tmp_path / "b", n_train=14, n_test=3, short_side=48, seed=1)
    c = demo.generate(tmp_path / "c", n_train=14, n_test=3, short_side=48, seed=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert ((a / "train_data/img_0000.png").read_bytes()
            != (c / "train_data/img_0000.png").read_bytes())


def test_rerun_reuses_or_replaces_and_never_deletes_foreign_folders(tmp_path):
    root = demo.generate(tmp_path / "d", n_train=14, n_test=2, short_side=48)
    stamp = (root / "train_data/img_0000.png").stat().st_mtime_ns
    demo.generate(tmp_path / "d", n_train=14, n_test=2, short_side=48)
    assert (root / "train_data/img_0000.png").stat().st_mtime_ns == stamp  # same args: kept
    demo.generate(tmp_path / "d", n_train=12, n_test=2, short_side=48)
    assert len(list((root / "train_data").glob("img_*.png"))) == 12  # no stale files left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(KitError, match="not a generated dataset"):
        demo.generate(tmp_path / "mine", n_train=14, n_test=2, short_side=48)
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_class_counts_make_triple_negative_the_minority():
    plan = demo.make_plan(691, 0, n_cartoon=60, n_green=50)
    counts = pd.Series([it.label for it in plan]).value_counts()
    assert counts.idxmin() == "Triple negative"
    assert 0.09 <= counts["Triple negative"] / 691 <= 0.13
    cartoons = [it for it in plan if it.kind == "cartoon"]
    assert len(cartoons) == 60 and sum(it.kind == "green" for it in plan) == 50
    assert {it.label for it in cartoons} == {"HER2(+)", "Luminal A"}
    default = demo.make_plan(120, 40)
    train = pd.Series([it.label for it in default if it.split == "train"]).value_counts()
    assert train.idxmin() == "Triple negative" and set(train.index) == set(CLASSES)
    assert sum(it.kind == "cartoon" for it in default) >= 2
    assert sum(it.kind == "green" and it.split == "train" for it in default) >= 2


def test_cartoons_reuse_a_real_images_mask_byte_for_byte(small):
    junk = _junk(small)
    cartoons = junk[junk.kind == "cartoon"]
    assert len(cartoons) >= 2
    folder = small / "train_data"
    for row in cartoons.itertuples():
        assert row.mask_of not in set(junk.sample_index)  # the host is a real scan
        own = (folder / row.sample_index.replace("img_", "mask_")).read_bytes()
        assert own == (folder / row.mask_of.replace("img_", "mask_")).read_bytes()
    groups = pd.Series(mask_groups(load_dataset(small).train))
    sizes = groups.value_counts()
    assert (sizes == 2).sum() == len(cartoons) and sizes.max() == 2  # exactly one pair each


def test_green_splats_only_on_the_planted_images(small):
    junk = _junk(small)
    green = {(r.split, r.sample_index) for r in junk.itertuples() if r.kind == "green"}
    assert any(split == "test" for split, _ in green)  # one test image, reported not dropped
    ds = load_dataset(small)
    for split, samples in (("train", ds.train), ("test", ds.test)):
        for s in samples:
            if (split, s.sample_index) in set(zip(junk.split, junk.sample_index)) - green:
                continue  # cartoons: bright-green variants may contain green pixels
            rgb = read_image(s.image).astype(int) / 255
            r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
            share = ((g > 0.7) & (g - r > 0.2) & (g - b > 0.2)).mean()
            assert (share > 0.001) == ((split, s.sample_index) in green), s.sample_index


def _stats(img, where):
    px = img[where].astype(np.float32)
    return [*px.mean(0), *px.std(0), (px.min(1) < 150).mean()]


def test_class_signal_lives_inside_the_mask(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    root = demo.generate(tmp_path / "s", n_train=80, n_test=0, short_side=96, seed=3,
                         n_cartoon=0, n_green=0)
    inside, outside, labels = [], [], []
    for s in load_dataset(root).train:
        img, mask = read_image(s.image), read_mask(s.mask)
        tissue = (img.max(2).astype(int) - img.min(2)) > 25
        inside.append(_stats(img, mask))
        outside.append(_stats(img, tissue & ~mask))
        labels.append(s.label)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(4, shuffle=True, random_state=0)
    f1_in = cross_val_score(clf, np.array(inside), labels, cv=cv, scoring="f1_macro").mean()
    f1_out = cross_val_score(clf, np.array(outside), labels, cv=cv, scoring="f1_macro").mean()
    assert f1_in > 0.7, f1_in  # chance is ~0.25; measured 0.87-0.95 over seeds 3-5
    assert f1_out < 0.35, f1_out  # measured 0.16-0.20


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(KitError, match="mask hosts"):
        demo.make_plan(10, 0, n_cartoon=5, n_green=2)
    with pytest.raises(KitError, match="short_side"):
        demo.make_plan(10, 0, short_side=8)


# --- ./run.sh demo --task LAYOUT ---------------------------------------------------------------

@pytest.mark.parametrize("layout", ["imagefolder", "csv", "csv_masks"])
def test_the_demo_data_stages_run_in_another_layout(tmp_path, layout):
    from kit.commands.demo import make_data
    from kit.config import load_config
    from kit.data import clean, folds, patches
    from kit.data.patches import load_patches
    from kit.paths import Paths

    data = make_data(tmp_path / "data", layout, seed=1, n_train=12, n_test=4, short_side=48)
    assert data.task.source == data.root / "task.yaml" and not data.task.builtin
    paths = Paths.from_root(tmp_path)
    assert len(clean.run_clean(paths, data, load_config("clean"))) == 0  # no junk detector
    patches.run_patches(paths, data, load_config("patches"))
    folds.run_folds(paths, data, load_config("folds"), seed=1)
    ids = {s.id for s in load_dataset(data).test}
    assert set(load_patches(paths, "test").samples.sample_index) == ids and len(ids) == 4
    folds = pd.read_csv(paths.folds_csv, dtype=str)
    assert len(folds) == 12 and set(folds.label) <= set(data.task.classes)


def test_the_demo_refuses_a_layout_it_does_not_generate(tmp_path, capsys):
    from kit.cli import main

    assert main(["demo", "--task", "an2dl.yaml", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "demo --task an2dl.yaml" in err and "imagefolder, csv, csv_masks" in err
    assert not any(tmp_path.iterdir())  # refused before writing anything


@pytest.mark.slow
def test_the_whole_demo_runs_in_the_csv_layout(tmp_path, capsys):
    from kit.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--task", "csv", "--out", str(out), "--n-train", "30", "--n-test", "6",
                 "--short-side", "96"]) == 0
    printed = capsys.readouterr().out
    for stage in ("demo data", "clean", "patches", "folds", "cv", "tune", "blend", "report"):
        assert any(line.startswith(stage) for line in printed.splitlines()), stage
    assert "OOF balanced accuracy" in printed and "(chance 0.33 for 3 classes)" in printed
    sub = pd.read_csv(out / "submissions" / "latest.csv", dtype=str)
    assert list(sub.columns) == ["case", "tissue"] and len(sub) == 6
    assert set(sub.tissue) <= {"Normal", "Benign", "Invasive"}
    assert (out / "runs" / "report.html").stat().st_size > 10_000


def test_a_demo_on_other_data_forgets_the_last_demos_outputs(tmp_path, capsys):
    from kit.commands.demo import _forget_other_data
    from kit.paths import Paths

    data, paths = tmp_path / "data", Paths.from_root(tmp_path)
    data.mkdir()
    (data / "a.png").write_bytes(b"one")
    _forget_other_data(paths, data)  # the first demo here: nothing to remove, data recorded
    for folder in (paths.runs_dir / "tiny_cnn", paths.folds_dir, paths.submissions_dir):
        folder.mkdir(parents=True, exist_ok=True)
    _forget_other_data(paths, data)  # the same data: the outputs stay
    assert (paths.runs_dir / "tiny_cnn").is_dir() and paths.folds_dir.is_dir()
    assert "removed" not in capsys.readouterr().out
    (data / "a.png").write_bytes(b"other")  # regenerated with other arguments
    _forget_other_data(paths, data)
    assert not (paths.runs_dir / "tiny_cnn").exists() and not paths.folds_dir.exists()
    assert not paths.submissions_dir.exists() and "were removed" in capsys.readouterr().out
    assert (data / "a.png").read_bytes() == b"other"  # the data itself is never touched
