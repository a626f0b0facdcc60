"""kit.data.dataset: loading and validating a dataset in the challenge layout, and the
validate CLI."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kit import CLASSES
from kit.data.dataset import find_root, load_dataset, read_image, read_mask, to_rgb_array
from kit.utils import KitError

REPO = Path(__file__).resolve().parents[1]


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)


def make_dataset(root: Path, n_train: int = 8, n_test: int = 3, size=(12, 16)) -> Path:
    """A tiny valid dataset: RGB images, 0/255 masks, labels cycling through CLASSES."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        folder = root / f"{split}_data"
        folder.mkdir(parents=True)
        for i in range(n):
            _png(folder / f"img_{i:04d}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
            mask = np.zeros(size, np.uint8)
            mask[i % size[0], :] = 255
            _png(folder / f"mask_{i:04d}.png", mask)
    rows = [f"img_{i:04d}.png,{CLASSES[i % len(CLASSES)]}" for i in range(n_train)]
    (root / "train_labels.csv").write_text("sample_index,label\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture
def ds(tmp_path):
    return make_dataset(tmp_path / "data")


def _labels(root: Path) -> list[str]:
    return (root / "train_labels.csv").read_text().splitlines()


def _set_labels(root: Path, lines: list[str]) -> None:
    (root / "train_labels.csv").write_text("\n".join(lines) + "\n")


def _problems(root: Path, **kwargs) -> tuple[str, list[str]]:
    with pytest.raises(KitError, match=r": (dataset is not usable \()?\d+ problems") as exc:
        load_dataset(root, **kwargs)
    return str(exc.value), exc.value.problems


def _cli(*args, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO),
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "kit", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)


# --- a good dataset ------------------------------------------------------------------------

def test_valid_dataset_loads(ds):
    d = load_dataset(ds)
    assert d.root == ds
    assert [s.sample_index for s in d.train] == [f"img_{i:04d}.png" for i in range(8)]
    assert [s.label for s in d.train] == [CLASSES[i % 4] for i in range(8)]
    assert all(s.label is None for s in d.test) and len(d.test) == 3
    assert d.train[3].image == ds / "train_data" / "img_0003.png"
    assert d.train[3].mask == ds / "train_data" / "mask_0003.png"
    assert d.dropped == []
    img, mask = read_image(d.train[0].image), read_mask(d.train[0].mask)
    assert img.dtype == np.uint8 and img.shape == (12, 16, 3)
    assert mask.dtype == bool and mask.shape == (12, 16) and mask.sum() == 16


def test_other_files_are_ignored(ds):
    (ds / "train_data" / ".DS_Store").write_bytes(b"junk")
    (ds / "train_data" / "notes.txt").write_text("x")
    assert len(load_dataset(ds).train) == 8


# --- each bad-input kind -------------------------------------------------------------------

def _unreadable(root):
    (root / "train_data" / "img_0001.png").write_bytes(b"this is not a png")
    return "img_0001.png", "unreadable or truncated PNG"


def _truncated(root):
    p = root / "train_data" / "img_0002.png"
    p.write_bytes(p.read_bytes()[:-20])
    return "img_0002.png", "unreadable or truncated PNG"


def _truncated_mask(root):
    p = root / "test_data" / "mask_0001.png"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    return "mask_0001.png", "unreadable or truncated PNG"


def _image_without_mask(root):
    (root / "train_data" / "mask_0003.png").unlink()
    return "img_0003.png", "image has no mask"


def _mask_without_image(root):
    (root / "test_data" / "img_0002.png").unlink()
    return "mask_0002.png", "mask has no image"


def _size_mismatch(root):
    _png(root / "train_data" / "mask_0004.png", np.zeros((12, 15), np.uint8))
    return "img_0004.png", "16x12 but its mask mask_0004.png is 15x12"


def _missing_columns(root):
    _set_labels(root, ["sample_index,class"] + _labels(root)[1:])
    return "train_labels.csv", "missing column(s) label"


def _unknown_label(root):
    lines = _labels(root)
    lines[4] = "img_0003.png,Triple Negative"  # capital N: not the challenge's spelling
    _set_labels(root, lines)
    return "train_labels.csv", ("line 5: unknown label 'Triple Negative' for img_0003.png; "
                                "did you mean 'Triple negative'?")


def _conflicting_rows(root):
    lines = _labels(root)
    first = lines.index("img_0004.png,Luminal A") + 1
    _set_labels(root, lines + ["img_0004.png,HER2(+)"])
    return "train_labels.csv", (f"img_0004.png appears on 2 lines ({first}, {len(lines) + 1}) "
                                "with different labels ('Luminal A', 'HER2(+)')")


def _duplicate_rows(root):
    lines = _labels(root)
    first = lines.index("img_0005.png,Luminal B") + 1
    _set_labels(root, lines + ["img_0005.png,Luminal B"])
    return "train_labels.csv", f"img_0005.png appears on 2 lines ({first}, {len(lines) + 1})"


def _row_without_image(root):
    _set_labels(root, _labels(root) + ["img_0099.png,Luminal A"])
    return "train_labels.csv", "row 'img_0099.png' has no image"


def _image_without_label(root):
    lines = _labels(root)
    _set_labels(root, [line for line in lines if not line.startswith("img_0006.png")])
    return "img_0006.png", "image has no label"


BAD_KINDS = [_unreadable, _truncated, _truncated_mask, _image_without_mask, _mask_without_image,
             _size_mismatch, _missing_columns, _unknown_label, _duplicate_rows,
             _conflicting_rows, _row_without_image, _image_without_label]


@pytest.mark.parametrize("breaker", BAD_KINDS, ids=lambda f: f.__name__.strip("_"))
def test_each_bad_input_gives_one_clear_line(ds, breaker):
    name, expected = breaker(ds)
    message, problems = _problems(ds)
    assert len(problems) == 1, problems
    assert name in problems[0] and expected in problems[0], problems[0]
    assert str(ds) in message


def test_all_problems_reported_at_once(ds):
    # rows are removed before rows are appended, so the expected line numbers stay right
    found = [breaker(ds) for breaker in (_unreadable, _truncated, _image_without_mask,
                                         _mask_without_image, _size_mismatch, _unknown_label,
                                         _image_without_label, _row_without_image,
                                         _duplicate_rows)]
    message, problems = _problems(ds)
    assert len(problems) == len(found), problems
    for name, expected in found:
        assert any(name in p and expected in p for p in problems), (name, expected, problems)
    assert f"{len(found)} problems" in message


def test_cli_bad_dataset_exit_2_one_line_per_problem(ds):
    found = [b(ds) for b in (_truncated, _image_without_mask, _size_mismatch,
                             _row_without_image, _image_without_label)]
    r = _cli("validate", "--data", str(ds))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and str(ds) in lines[0]
    assert len(lines) == 1 + len(found), lines
    for name, expected in found:
        assert sum(name in line and expected in line for line in lines[1:]) == 1, (name, lines)


def test_cli_good_dataset_and_missing_root(tmp_path, ds):
    r = _cli("validate", "--data", str(ds))
    assert r.returncode == 0, r.stderr
    assert "8 training pairs, 3 test pairs" in r.stdout
    r = _cli("validate", env_extra={"KIT_DATA": str(tmp_path / "nowhere")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert str(tmp_path / "nowhere") in lines[0] and "not found" in lines[0]
    assert "--data" in lines[0] and "KIT_DATA" in lines[0]


# --- --skip-bad ----------------------------------------------------------------------------

def test_skip_bad_drops_bad_samples_with_warning(ds):
    for breaker in (_truncated, _image_without_mask, _size_mismatch, _mask_without_image,
                    _row_without_image, _image_without_label):
        breaker(ds)
    with pytest.warns(UserWarning, match="--skip-bad: dropping 6 samples") as rec:
        d = load_dataset(ds, skip_bad=True)
    text = str(rec[0].message)
    assert "img_0002.png" in text and "img_0099.png" in text
    assert [s.sample_index for s in d.train] == ["img_0000.png", "img_0001.png", "img_0005.png",
                                                 "img_0007.png"]
    assert [s.sample_index for s in d.test] == ["img_0000.png", "img_0001.png"]
    assert len(d.dropped) == 6


def test_skip_bad_does_not_hide_labels_file_problems(ds):
    _missing_columns(ds)  # the file as a whole is wrong: nothing to drop row by row
    _truncated(ds)
    message, problems = _problems(ds, skip_bad=True)
    assert "not usable" in message
    assert len(problems) == 2


def test_skip_bad_drops_label_row_problems_one_warning_line_each(ds):
    lines = _labels(ds)
    lines[2] = "img_0001.png,Luminal  b"  # unknown label (double space, lower-case b)
    lines.append("img_0004.png,HER2(+)")  # conflicts with img_0004.png,Luminal A
    lines.append("img_0005.png,Luminal B")  # identical repeat: collapses to one row
    lines.append("img_0099.png,Luminal A")  # no such image
    _set_labels(ds, lines)
    with pytest.warns(UserWarning) as rec:
        d = load_dataset(ds, skip_bad=True)
    assert len(rec) == 1
    text = str(rec[0].message).splitlines()
    assert text[0] == ("--skip-bad: dropping 3 samples with problems and 1 repeated row(s) of "
                       "train_labels.csv (one kept):")
    body = text[1:]
    assert len(body) == 4 and all(line.startswith("  ") and "train_labels.csv" in line
                                  for line in body)
    assert sum("img_0001.png" in line and "did you mean 'Luminal B'?" in line for line in body) == 1
    assert sum("img_0004.png" in line and "different labels" in line for line in body) == 1
    assert sum("img_0005.png" in line and "appears on 2 lines" in line for line in body) == 1
    assert sum("img_0099.png" in line and "has no image" in line for line in body) == 1
    names = [s.sample_index for s in d.train]
    assert names == ["img_0000.png", "img_0002.png", "img_0003.png", "img_0005.png",
                     "img_0006.png", "img_0007.png"]
    assert dict((s.sample_index, s.label) for s in d.train)["img_0005.png"] == "Luminal B"
    assert len(d.test) == 3 and len(d.dropped) == 4


def test_row_problems_without_skip_bad_all_reported(ds):
    lines = _labels(ds)
    lines[2] = "img_0001.png,Luminal  b"
    _set_labels(ds, lines + ["img_0004.png,HER2(+)", "img_0005.png,Luminal B"])
    _truncated(ds)
    message, problems = _problems(ds)
    assert "4 problems" in message and "--skip-bad" in message
    assert len(problems) == 4


@pytest.mark.parametrize("typed, meant", [
    ("triple  negative", "Triple negative"), ("Luminal a", "Luminal A"), ("HER2(+) ", "HER2(+)"),
    (" luminal B", "Luminal B"), ("her2 (+)", "HER2(+)"), ("TRIPLE NEGATIVE", "Triple negative"),
])
def test_unknown_label_suggests_the_class_it_spells(ds, typed, meant):
    lines = _labels(ds)
    lines[3] = f"img_0002.png,{typed}"
    _set_labels(ds, lines)
    _, problems = _problems(ds)
    assert problems == [f"{ds / 'train_labels.csv'}: line 4: unknown label {typed!r} for "
                        f"img_0002.png; did you mean {meant!r}?"]


@pytest.mark.parametrize("typed", ["HER2+", "Luminal C", "TNBC", ""])
def test_unknown_label_without_a_near_class_lists_the_allowed_ones(ds, typed):
    lines = _labels(ds)
    lines[3] = f"img_0002.png,{typed}"
    _set_labels(ds, lines)
    _, problems = _problems(ds)
    assert len(problems) == 1 and "did you mean" not in problems[0]
    assert f"unknown label {typed!r}" in problems[0]
    assert "allowed: Luminal A, Luminal B, HER2(+), Triple negative" in problems[0]


def test_cli_skip_bad(ds):
    _truncated(ds)
    r = _cli("validate", "--data", str(ds), "--skip-bad")
    assert r.returncode == 0, r.stderr
    assert "7 training pairs" in r.stdout
    assert "dropping 1 samples" in r.stderr and "img_0002.png" in r.stderr


def test_cli_clean_skip_bad_unknown_label_and_duplicate_row(ds, tmp_path):
    """Issue 11's check: clean --skip-bad goes through, one warning line per dropped row."""
    lines = _labels(ds)
    lines[4] = "img_0003.png,triple  negative"
    _set_labels(ds, lines + ["img_0006.png,Luminal B"])  # img_0006 is HER2(+) above
    work = tmp_path / "work"
    r = _cli("clean", "--data", str(ds), "--workdir", str(work))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 3 and "--skip-bad" in errors[0]
    assert "did you mean 'Triple negative'?" in errors[1] + errors[2]
    r = _cli("clean", "--data", str(ds), "--workdir", str(work), "--skip-bad")
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines()
              if line.startswith("  ") and "train_labels.csv" in line]
    assert len(warned) == 2, r.stderr
    assert "warning: --skip-bad: dropping 2 samples with problems:" in r.stderr
    assert "of 6 training images flagged" in r.stdout
    scores = pd.read_csv(work / "runs" / "clean" / "scores.csv")
    assert sorted(scores[scores.split == "train"].sample_index) == [
        f"img_{i:04d}.png" for i in (0, 1, 2, 4, 5, 7)]


# --- non-RGB inputs ------------------------------------------------------------------------

def _modes():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    rgba = np.dstack([rgb, np.full((6, 7), 128, np.uint8)])
    deep = (rng.integers(0, 65536, (6, 7))).astype(np.uint16)
    deep[0, 0] = 65535
    pal = Image.fromarray(rgb).quantize(colors=8)
    return {
        "RGBA": (Image.fromarray(rgba), rgb),
        "L": (Image.fromarray(gray), np.repeat(gray[..., None], 3, axis=2)),
        "I;16": (Image.fromarray(deep), np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, 2)),
        "P": (pal, np.asarray(pal.convert("RGB"))),
    }


@pytest.mark.parametrize("mode", ["RGBA", "L", "I;16", "P"])
def test_non_rgb_images_are_converted(ds, mode):
    im, expected = _modes()[mode]
    assert im.mode == mode
    path = ds / "train_data" / "img_0000.png"
    im.save(path)
    _png(ds / "train_data" / "mask_0000.png", np.full((6, 7), 255, np.uint8))
    d = load_dataset(ds)  # converted, not rejected
    arr = read_image(d.train[0].image)
    assert arr.dtype == np.uint8 and arr.shape == (6, 7, 3)
    np.testing.assert_array_equal(arr, expected)
    np.testing.assert_array_equal(to_rgb_array(im), expected)


def test_palette_image_colours_are_real_colours():
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (200, 30, 90)
    arr = to_rgb_array(Image.fromarray(rgb).quantize(colors=2))
    assert tuple(arr[0, 0]) == (200, 30, 90) and tuple(arr[1, 1]) == (0, 0, 0)


@pytest.mark.parametrize("kind", ["L01", "L255", "P", "RGBA", "I;16"])
def test_masks_any_positive_value_is_inside(tmp_path, kind):
    inside = np.zeros((5, 6), bool)
    inside[1:3, 2:5] = True
    if kind == "L01":
        im = Image.fromarray(inside.astype(np.uint8))
    elif kind == "L255":
        im = Image.fromarray(inside.astype(np.uint8) * 255)
    elif kind == "P":
        im = Image.fromarray(inside.astype(np.uint8) * 255).convert("P")
    elif kind == "RGBA":
        im = Image.fromarray(np.dstack([inside.astype(np.uint8) * 255] * 3
                                       + [np.full((5, 6), 255, np.uint8)]))
    else:
        im = Image.fromarray(inside.astype(np.uint16) * 65535)
    im.save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png")
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, inside)


# --- finding the root ----------------------------------------------------------------------

def test_nested_kaggle_style_root_is_found(tmp_path):
    real = make_dataset(tmp_path / "input" / "an2dl2526c2v2")
    (tmp_path / "input" / "other-dataset").mkdir()  # Kaggle mounts several inputs side by side
    assert find_root(tmp_path / "input") == real
    assert find_root(real) == real
    assert load_dataset(tmp_path / "input").root == real


def test_ambiguous_or_empty_root_is_refused(tmp_path):
    make_dataset(tmp_path / "input" / "a")
    make_dataset(tmp_path / "input" / "b")
    with pytest.raises(KitError, match="no train_data/ folder here"):
        find_root(tmp_path / "input")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KitError, match="no train_data/ folder here"):
        find_root(tmp_path / "empty")


def test_missing_root_message(tmp_path):
    with pytest.raises(KitError, match="dataset folder not found; pass --data DIR"):
        load_dataset(tmp_path / "nope")


def test_missing_test_folder_and_labels_file(ds):
    for p in (ds / "test_data").iterdir():
        p.unlink()
    (ds / "test_data").rmdir()
    (ds / "train_labels.csv").unlink()
    message, problems = _problems(ds)
    assert "not usable" in message
    assert any("train_labels.csv: labels file missing" in p for p in problems)
    assert any("test_data: folder missing" in p for p in problems)


# --- datasets described by a task ------------------------------------------------------------

def _task_data(tmp_path, layout="csv_masks"):
    from kit.data.task_synth import write_task_dataset
    from kit.task import load_task

    root = write_task_dataset(tmp_path / layout, layout, seed=0, n_train=9, n_test=3)
    return root, load_task(None, root)


def test_the_builtin_task_given_explicitly_is_the_default(ds):
    from kit.data.dataset import Sample, mask_groups
    from kit.task import default_task, load_task

    d = load_dataset(ds)
    assert d.task is default_task()
    for spec in (default_task(), "an2dl2526c2v2", str(default_task().source)):
        other = load_dataset(ds, task=spec)
        assert (other.root, other.train, other.test, other.dropped) == (d.root, d.train, d.test,
                                                                         d.dropped)
    assert load_task(None, ds) is default_task()  # no task.yaml in the data folder
    s = d.train[0]
    assert s.sample_index == s.id == "img_0000.png" and s.group is None
    assert Sample("a.png", s.image, s.mask, "Luminal A") == Sample(
        id="a.png", image=s.image, mask=s.mask, label="Luminal A", group=None)
    alone = Sample("b.png", s.image)
    assert alone.mask is None and mask_groups([alone, s]) == {"b.png": "b.png",
                                                              s.id: s.id}


def test_a_task_string_spec_and_the_test_ids(tmp_path):
    from kit.data.dataset import expected_test_ids

    root, _ = _task_data(tmp_path, "imagefolder")
    (root / "task.yaml").unlink()  # the built-in task by name instead
    d = load_dataset(root, task="imagefolder")
    assert d.task.name == "imagefolder" and len(d.train) == 9
    assert expected_test_ids(root, task=d.task) == [s.id for s in d.test] == [
        "case_0009", "case_0010", "case_0011"]
    with pytest.raises(KitError, match="no train_data/ folder here"):
        load_dataset(root)  # without the task: AN2DL's layout, as every stage reads it today


def test_hidden_files_are_not_images(tmp_path):
    root, task = _task_data(tmp_path, "csv")
    (root / "test" / "._case_0009.png").write_bytes(b"macOS resource fork")
    (root / "train" / ".DS_Store").write_bytes(b"x")
    assert len(load_dataset(root, task=task).test) == 3


def _task_problems(root, task, **kwargs):
    with pytest.raises(KitError) as exc:
        load_dataset(root, task=task, **kwargs)
    return str(exc.value), exc.value.problems


def test_task_data_problems_name_the_task_file_and_key(tmp_path):
    root, task = _task_data(tmp_path)
    where = root / "task.yaml"
    table = pd.read_csv(root / "train.csv", dtype=str)
    table.loc[1, "tissue"] = "benign"  # case only: suggested
    table.loc[2, "tissue"] = "Cancer"
    table.loc[len(table)] = ["case_0099", "Normal", "P999"]  # no such image
    table.loc[len(table)] = ["case_0004", table.loc[4, "tissue"], "P777"]  # another patient
    table.to_csv(root / "train.csv", index=False)
    _png(root / "masks" / "train" / "mask_0005.png", np.zeros((10, 10), np.uint8))
    (root / "masks" / "train" / "mask_0006.png").unlink()
    (root / "train" / "case_0007.png").unlink()  # its mask stays: a mask without image
    message, problems = _task_problems(root, task)
    assert "7 problems" in message and "--skip-bad" in message
    expected = [
        ("line 3: unknown label 'benign' for case_0001; did you mean 'Benign'? "
         f"(classes in {where})"),
        ("line 4: unknown label 'Cancer' for case_0002; allowed: Normal, Benign, Invasive "
         f"(classes in {where})"),
        "case_0004 appears on 2 lines (6, 12) with different patient_id values",
        f"but its mask mask_0005.png is 10x10; they must match (masks.train in {where})",
        (f"case_0006.png: image has no mask (expected {root / 'masks/train/mask_0006.png'}) "
         f"(masks.train in {where})"),
        f"mask_0007.png: mask has no image (expected {root / 'train/case_0007.png'})",
        ("train.csv: row 'case_0099' has no image train/case_0099.png; remove the row or "
         f"restore the image (images.train in {where})"),
    ]
    assert len(problems) == len(expected), problems
    for line in expected:
        assert sum(line in p for p in problems) == 1, (line, problems)
    with pytest.warns(UserWarning, match="dropping 7 samples"):
        d = load_dataset(root, task=task, skip_bad=True)
    assert [s.id for s in d.train] == ["case_0000", "case_0003", "case_0008"]
    assert all(s.group is not None for s in d.train)


def test_a_pattern_that_matches_no_file_is_one_line(tmp_path):
    root, task = _task_data(tmp_path, "csv")
    for p in (root / "test").iterdir():
        p.rename(p.with_suffix(".jpg"))
    for p in (root / "train").iterdir():
        p.rename(p.with_suffix(".tif"))
    message, problems = _task_problems(root, task)
    assert "not usable (2 problems)" in message  # not one "row has no image" per row
    assert problems[0] == (f"{root / 'train'}: images.train 'train/{{id}}.png' matches no file "
                           "here (it holds e.g. train/case_0000.tif); rename the files to "
                           f"follow it, or fix images.train in {root / 'task.yaml'}")
    assert problems[1].startswith(f"{root / 'test'}: images.test 'test/{{id}}.png' matches no ")


def test_a_mask_pattern_that_matches_no_file(tmp_path):
    root, task = _task_data(tmp_path)
    for p in (root / "masks" / "train").iterdir():
        p.rename(p.with_name(p.name.replace("mask_", "m_")))
    _, problems = _task_problems(root, task)
    assert len(problems) == 1, problems
    assert problems[0] == (f"{root / 'masks/train'}: masks.train 'masks/train/mask_{{num}}.png' "
                           "matches no file here (it holds e.g. masks/train/m_0000.png); rename "
                           f"the files to follow it, or fix masks.train in {root / 'task.yaml'}")
    shutil.rmtree(root / "masks" / "test")
    _, problems = _task_problems(root, task)
    assert any(p.startswith(f"{root / 'masks/test'}: folder missing; masks.test") for p in problems)


def test_folders_layout_problems(tmp_path):
    root, task = _task_data(tmp_path, "imagefolder")
    (root / "train" / "Stroma").mkdir()
    one = next((root / "train" / "stroma").iterdir())
    one.rename(root / "train" / "Stroma" / one.name)
    (root / "train" / "lymph").mkdir()
    first = next((root / "train" / "tumour").iterdir())
    shutil.copy(first, root / "train" / "lymph" / "x_01.png")
    shutil.copy(first, root / "train" / "adipose" / first.name)  # one id in two classes
    _, problems = _task_problems(root, task)
    where = root / "task.yaml"
    assert problems == [
        (f"{root / 'train/Stroma'}: folder 'Stroma' is not a class (1 images); did you mean "
         f"'stroma'? rename the folder (classes in {where})"),
        (f"{root / 'train/lymph'}: folder 'lymph' is not a class (1 images); allowed: adipose, "
         f"stroma, tumour; rename the folder or add the class (classes in {where})"),
        (f"{root / 'train/tumour' / first.name}: id {first.stem!r} is also "
         f"{root / 'train/adipose' / first.name}; ids must be unique across class folders, "
         "rename or delete one"),
    ]
    with pytest.warns(UserWarning, match="dropping 3 samples"):
        d = load_dataset(root, task=task, skip_bad=True)
    assert len(d.train) == 9 - 1 - 1  # Stroma's image, and the id in two folders
    assert first.stem not in {s.id for s in d.train}


def test_find_root_speaks_the_tasks_layout(tmp_path):
    from kit.task import load_task

    task = load_task("imagefolder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KitError) as exc:
        load_dataset(tmp_path / "empty", task=task)
    assert str(exc.value) == (f"{tmp_path / 'empty'}: no train/ folder here (nor one level "
                              "down); pass --data to the folder holding train/ and test/")
    root, _ = _task_data(tmp_path / "input", "imagefolder")
    assert load_dataset(tmp_path / "input", task=task).root == root  # one level down


def test_cli_validate_task(tmp_path):
    root, _ = _task_data(tmp_path, "csv")
    r = _cli("validate", "--data", str(root))  # the data folder's task.yaml
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == f"{root}: 9 training images, 3 test images"
    assert f"task synthetic-csv ({root / 'task.yaml'}): 3 classes, metric balanced_accuracy, " \
           "no masks" in out
    assert any("patient_id groups (largest" in line for line in out)
    r = _cli("validate", "--data", str(root), "--task", "imagefolder")
    assert r.returncode == 2 and "images.train 'train/{label}/{id}.png' matches no file" in r.stderr
    table = pd.read_csv(root / "train.csv", dtype=str)
    table.loc[0, "tissue"] = "Tumour"
    table.to_csv(root / "train.csv", index=False)
    (root / "test" / "case_0010.png").write_bytes(b"not a png")
    r = _cli("validate", "--data", str(root), "--task", str(root / "task.yaml"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3 and "2 problems" in lines[0]
    assert sum("unknown label 'Tumour' for case_0000" in line for line in lines[1:]) == 1
    assert sum("case_0010.png: unreadable or truncated PNG" in line for line in lines[1:]) == 1
