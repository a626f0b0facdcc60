"""kit.data.folds: stratified, image-grouped K-fold split, its file and its overwrite guard."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from kit import CLASSES
from kit.cli import main
from kit.config import load_config
from kit.data.dataset import load_dataset
from kit.data.folds import (
    StratifiedGroupFolds,
    assign_folds,
    build_groups,
    fold_table,
    folds_hash,
    load_folds,
    run_folds,
)
from kit.data.neardup import COLUMNS as NEAR_COLUMNS
from kit.data.neardup import near_duplicates_csv
from kit.paths import Paths
from kit.utils import KitError, sha256_file

REPO = Path(__file__).resolve().parents[1]
N_TRAIN = 60
COUNTS = {"Luminal A": 16, "Luminal B": 20, "HER2(+)": 14, "Triple negative": 10}
# Byte-identical mask files: the first image's mask is copied to the others.
SHARED_MASKS = [(1, 2), (10, 11), (20, 21, 22), (30, 45)]
OUTLIERS = "sample_index,reason,score\nimg_0005.png,green,0.031\nimg_0011.png,cartoon,0.97\n"
DROPPED = {"img_0005.png", "img_0011.png"}


def _name(i: int) -> str:
    return f"img_{i:04d}.png"


def make_folds_dataset(root: Path) -> Path:
    """60 tiny training pairs (8x10) with some shared mask files, 4 test pairs."""
    rng = np.random.default_rng(0)
    labels = rng.permutation([c for c, n in COUNTS.items() for _ in range(n)])
    for split, n in (("train", N_TRAIN), ("test", 4)):
        folder = root / f"{split}_data"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (10, 8, 3), dtype=np.uint8)).save(
                folder / f"img_{i:04d}.png")
            mask = np.zeros((10, 8), np.uint8)
            mask[8:, 2:6] = 255
            mask.flat[i] = 255  # a different pixel per image: every mask file is unique ...
            Image.fromarray(mask).save(folder / f"mask_{i:04d}.png")
    for group in SHARED_MASKS:  # ... except these, copied byte for byte
        first = (root / "train_data" / f"mask_{group[0]:04d}.png").read_bytes()
        for i in group[1:]:
            (root / "train_data" / f"mask_{i:04d}.png").write_bytes(first)
    rows = [f"{_name(i)},{label}" for i, label in enumerate(labels)]
    (root / "train_labels.csv").write_text("sample_index,label\n" + "\n".join(rows) + "\n")
    return root


def make_workdir(root: Path, near: str = "") -> Paths:
    """A work directory whose clean stage has run (hand-written outliers.csv and
    near_duplicates.csv, by default with no near-duplicates)."""
    paths = Paths.from_root(root)
    paths.folds_dir.mkdir(parents=True)
    paths.outliers_csv.write_text(OUTLIERS)
    write_near(paths, near)
    return paths


def write_near(paths: Paths, rows: str) -> None:
    """``near_duplicates.csv`` as clean writes it, from ``group,split,sample_index`` lines."""
    lines = [",".join([*r.split(","), "image", "train/x.png", "3"]) for r in rows.split()]
    path = near_duplicates_csv(paths)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(",".join(NEAR_COLUMNS) + "\n" + "".join(f"{line}\n" for line in lines))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folds_dataset(tmp_path_factory.mktemp("folds") / "data")


@pytest.fixture
def paths(tmp_path):
    return make_workdir(tmp_path / "work")


def _warnings(caplog) -> list[str]:
    """The warning lines the kit logger gave during the test."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "kit", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)


# --- the scikit-learn style splitter -------------------------------------------------------

def _toy(n=90, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.choice(4, size=n, p=[0.3, 0.3, 0.25, 0.15])
    groups = np.arange(n)
    groups[1::7] = groups[0::7][: len(groups[1::7])]  # every 7th pair shares a group
    return np.zeros((n, 2)), y, groups


def test_constructor_only_stores_parameters():
    folds = StratifiedGroupFolds(n_splits=3, shuffle=False, random_state=7)
    assert vars(folds) == {"n_splits": 3, "shuffle": False, "random_state": 7}
    assert StratifiedGroupFolds().n_splits == 5 and StratifiedGroupFolds().shuffle is True
    assert folds.get_n_splits() == 3 and folds.get_n_splits(np.zeros(9), None, None) == 3


def test_split_yields_a_grouped_partition():
    X, y, groups = _toy()
    splits = list(StratifiedGroupFolds(n_splits=3, random_state=0).split(X, y, groups))
    assert len(splits) == 3
    tests = [set(test) for _, test in splits]
    assert set().union(*tests) == set(range(len(y))) and sum(map(len, tests)) == len(y)
    for train, test in splits:
        assert set(train) == set(range(len(y))) - set(test)
        assert not set(groups[train]) & set(groups[test])


def test_split_seed_semantics():
    X, y, groups = _toy()

    def folds_of(splitter):
        out = np.empty(len(y), int)
        for k, (_, test) in enumerate(splitter.split(X, y, groups)):
            out[test] = k
        return out

    same = StratifiedGroupFolds(3, random_state=1)
    np.testing.assert_array_equal(folds_of(same), folds_of(same))  # an int repeats
    assert (folds_of(StratifiedGroupFolds(3, random_state=1))
            != folds_of(StratifiedGroupFolds(3, random_state=2))).any()
    gen = StratifiedGroupFolds(3, random_state=np.random.default_rng(0))
    assert (folds_of(gen) != folds_of(gen)).any()  # a Generator advances
    still = StratifiedGroupFolds(3, shuffle=False, random_state=5)  # seed ignored, no error
    np.testing.assert_array_equal(folds_of(still), folds_of(StratifiedGroupFolds(3, shuffle=False)))
    with pytest.raises(ValueError, match="groups"):
        next(StratifiedGroupFolds(3).split(X, y, None))


def test_split_works_as_cv_in_scikit_learn():
    from sklearn.dummy import DummyClassifier
    from sklearn.model_selection import cross_val_predict

    X, y, groups = _toy()
    pred = cross_val_predict(DummyClassifier(), X, y, groups=groups,
                             cv=StratifiedGroupFolds(3, random_state=0))
    assert pred.shape == y.shape


# --- assign_folds --------------------------------------------------------------------------

def test_stratification_per_fold_proportions_close_to_global():
    rng = np.random.default_rng(3)
    n = 600
    labels = rng.choice(CLASSES, size=n, p=[0.3, 0.32, 0.27, 0.11])
    ids = [_name(i) for i in range(n)]
    groups = list(ids)
    for i in range(0, 120, 2):  # 60 pairs of same-label near-duplicates
        labels[i + 1] = labels[i]
        groups[i + 1] = groups[i]
    folds = assign_folds(ids, labels, groups, n_splits=5, seed=42)
    df = pd.DataFrame({"label": labels, "fold": folds})
    glob = df.label.value_counts(normalize=True)
    for k, part in df.groupby("fold"):
        share = part.label.value_counts(normalize=True).reindex(glob.index, fill_value=0)
        assert (share - glob).abs().max() < 0.02, (k, share.round(3).to_dict())
        assert abs(len(part) - n / 5) <= 3
    # a plain random split of the same sizes is much further off: the bound above means something
    rand = rng.permutation(np.arange(n) % 5)
    worst = max((pd.Series(labels[rand == k]).value_counts(normalize=True)
                 .reindex(glob.index, fill_value=0) - glob).abs().max() for k in range(5))
    assert worst > 0.02


def test_assign_folds_ignores_input_order_and_keeps_groups():
    rng = np.random.default_rng(0)
    ids = [_name(i) for i in range(80)]
    labels = rng.choice(CLASSES, size=80)
    groups = [_name(i - i % 3) for i in range(80)]  # triples
    folds = dict(zip(ids, assign_folds(ids, labels, groups, 4, seed=9)))
    perm = rng.permutation(80)
    shuffled = assign_folds([ids[i] for i in perm], labels[perm], [groups[i] for i in perm], 4, 9)
    assert dict(zip([ids[i] for i in perm], shuffled)) == folds
    for g in set(groups):
        assert len({folds[i] for i, gi in zip(ids, groups) if gi == g}) == 1
    assert set(folds.values()) == {0, 1, 2, 3}


def test_assign_folds_too_few_groups():
    ids = [_name(i) for i in range(6)]
    with pytest.raises(KitError, match="only 3 independent image groups for 5 folds"):
        assign_folds(ids, ["Luminal A", "Luminal B"] * 3, ["a", "a", "b", "b", "c", "c"], 5, 0)


def test_build_groups_keeps_each_sources_labels_apart(data):
    ds = load_dataset(data)
    near = {_name(40): "1", _name(41): "1", _name(50): "2"}
    extra = {_name(42): "1", _name(43): "1"}
    groups = build_groups(ds.train, extra, near)
    assert groups[_name(40)] == groups[_name(41)] == _name(40)
    assert groups[_name(42)] == groups[_name(43)] == _name(42)
    assert groups[_name(50)] == _name(50)  # a group of one is no group


def test_build_groups_merges_masks_and_extra_transitively(data):
    ds = load_dataset(data)
    # img_0045 shares img_0030's mask file, so "y" chains img_0050 to both
    extra = {_name(40): "x", _name(41): "x", _name(45): "y", _name(50): "y",
             _name(99): "x"}  # img_0099 is no training image: ignored
    groups = build_groups(ds.train, extra)
    assert groups[_name(2)] == groups[_name(1)] == _name(1)
    assert groups[_name(20)] == groups[_name(21)] == groups[_name(22)] == _name(20)
    assert groups[_name(30)] == groups[_name(45)] == groups[_name(50)] == _name(30)
    assert groups[_name(40)] == groups[_name(41)] == _name(40)
    assert groups[_name(3)] == _name(3)
    assert len(set(groups.values())) == N_TRAIN - 1 - 1 - 2 - 2 - 1
    plain = build_groups(ds.train)  # mask files only
    assert ([plain[_name(i)] for i in (40, 41, 45, 50)]
            == [_name(40), _name(41), _name(30), _name(50)])
    assert len(set(plain.values())) == N_TRAIN - 1 - 1 - 2 - 1


# --- run_folds: the stage ------------------------------------------------------------------

def test_run_folds_writes_the_documented_file(data, paths, capsys):
    df = run_folds(paths, data, load_config("folds"), seed=42)
    text = paths.folds_csv.read_bytes().decode()
    assert text.startswith("sample_index,label,fold,group\n") and "\r" not in text
    written = pd.read_csv(paths.folds_csv, dtype={"sample_index": str, "group": str})
    pd.testing.assert_frame_equal(written, df)
    assert list(written.sample_index) == sorted(written.sample_index)
    assert set(written.sample_index) == {_name(i) for i in range(N_TRAIN)} - DROPPED
    assert sorted(written.fold.unique()) == [0, 1, 2, 3, 4]
    labels = pd.read_csv(data / "train_labels.csv").set_index("sample_index").label
    assert (written.set_index("sample_index").label == labels.loc[written.sample_index]).all()

    out = capsys.readouterr().out
    assert fold_table(written, 5) in out
    for cls in CLASSES:
        assert cls in out
    cfg = yaml.safe_load((paths.runs_dir / "folds" / "config.yaml").read_text())
    assert cfg["n_splits"] == 5 and cfg["seed"] == 42
    assert cfg["folds_sha256"] == sha256_file(paths.folds_csv)


def _assert_groups_share_a_fold(data, paths) -> dict:
    """Two seeds' splits keep the shared masks, (40, 41) and (30, 45, 50) each in one fold;
    the folds config, as written, is returned."""
    for seed in (3, 4):
        df = run_folds(paths, data, load_config("folds"), seed=seed,
                       force=True).set_index("sample_index").fold
        for group in SHARED_MASKS + [(40, 41), (30, 45, 50)]:
            kept = [_name(i) for i in group if _name(i) not in DROPPED]
            assert df.loc[kept].nunique() == 1, {k: df[k] for k in kept}
    cfg = yaml.safe_load((paths.runs_dir / "folds" / "config.yaml").read_text())
    assert cfg["n_groups"] == len(df) - 1 - 2 - 2 - 1  # (1,2), (20,21,22), (30,45,50), (40,41)
    return cfg


def test_no_group_split_across_folds(data, paths):
    # a hand-made near-duplicate list; img_0045 also shares img_0030's mask file
    paths.groups_csv.write_text("sample_index,group\n"
                                f"{_name(40)},scan-7\n{_name(41)},scan-7\n"
                                f"{_name(45)},scan-9\n{_name(50)},scan-9\n")
    cfg = _assert_groups_share_a_fold(data, paths)
    assert cfg["groups_csv"] == str(paths.groups_csv)


def test_near_duplicate_groups_share_a_fold_and_are_recorded(data, paths):
    # group 1: two training images and a test image; group 2: a training image and a test
    # image only (no effect on the split); img_0045 also shares img_0030's mask file
    write_near(paths, f"1,train,{_name(40)} 1,train,{_name(41)} 1,test,{_name(2)} "
                      f"2,train,{_name(3)} 2,test,{_name(1)} "
                      f"3,train,{_name(45)} 3,train,{_name(50)}")
    cfg = _assert_groups_share_a_fold(data, paths)
    grouping = cfg["grouping"]
    assert grouping["sources"] == ["shared_masks", "near_duplicates"]
    near_csv = near_duplicates_csv(paths)
    assert grouping["near_duplicates"]["file"] == str(near_csv)
    assert grouping["near_duplicates"]["sha256"] == sha256_file(near_csv)
    assert grouping["near_duplicates"]["groups"] == 3 and grouping["groups_csv"] is None
    # the user's file is merged on top, with its own group labels ("1" is not near's "1")
    paths.groups_csv.write_text(f"sample_index,group\n{_name(6)},1\n{_name(7)},1\n")
    df = run_folds(paths, data, load_config("folds"), seed=3,
                   force=True).set_index("sample_index").fold
    assert df[_name(6)] == df[_name(7)]
    cfg = yaml.safe_load((paths.runs_dir / "folds" / "config.yaml").read_text())
    assert cfg["grouping"]["sources"] == ["shared_masks", "near_duplicates", "groups_csv"]
    assert cfg["n_groups"] == len(df) - 1 - 2 - 2 - 1 - 1


def test_missing_near_duplicates_file_warns_and_is_recorded(data, paths, caplog):
    near_duplicates_csv(paths).unlink()
    run_folds(paths, data, load_config("folds"), seed=1)
    assert any(re.search(r"near_duplicates.csv not found.*rerun ./run.sh clean", w)
               for w in _warnings(caplog))
    cfg = yaml.safe_load((paths.runs_dir / "folds" / "config.yaml").read_text())
    assert cfg["grouping"] == {"sources": ["shared_masks"], "near_duplicates": None,
                               "groups_csv": None}


def test_near_duplicates_of_another_dataset_are_refused(data, paths):
    write_near(paths, "1,train,img_0001.png 1,train,img_0500.png 2,test,img_0900.png")
    with pytest.raises(KitError, match=r"near_duplicates.csv: lists 1 training image\(s\) not in "
                                       r"the dataset \(img_0500.png\); rerun ./run.sh clean"):
        run_folds(paths, data, load_config("folds"))
    near_duplicates_csv(paths).write_text("sample_index,cluster\nimg_0001.png,1\n")
    with pytest.raises(KitError, match="missing column"):
        run_folds(paths, data, load_config("folds"))


def test_changed_grouping_is_named_when_the_split_changes(data, paths):
    run_folds(paths, data, load_config("folds"), seed=1)
    first = paths.folds_csv.read_bytes()
    # near-duplicates found since: many pairs, so the split cannot stay the same
    write_near(paths, " ".join(f"{k},train,{_name(i)} {k},train,{_name(i + 25)}"
                               for k, i in enumerate(range(12, 24), start=1)))
    with pytest.raises(KitError, match="already holds a different split") as exc:
        run_folds(paths, data, load_config("folds"), seed=1)
    assert "different split" in str(exc.value)
    assert "grouping since the last split: runs/clean/near_duplicates.csv changed" in str(exc.value)
    assert paths.folds_csv.read_bytes() == first
    run_folds(paths, data, load_config("folds"), seed=1, force=True)
    paths.groups_csv.write_text(f"sample_index,group\n{_name(0)},a\n{_name(3)},a\n"
                                f"{_name(4)},b\n{_name(6)},b\n{_name(7)},b\n")
    with pytest.raises(KitError, match="folds/groups.csv added"):
        run_folds(paths, data, load_config("folds"), seed=1)


def test_run_folds_stratifies(data, paths):
    df = run_folds(paths, data, load_config("folds", {"n_splits": 4}), seed=0)
    counts = pd.crosstab(df.fold, df.label)
    total = df.label.value_counts()
    for cls in CLASSES:
        assert (counts[cls] - total[cls] / 4).abs().max() <= 1.5, counts


def test_bad_groups_file(data, paths):
    paths.groups_csv.write_text("sample_index,group\nimg_9999.png,a\nimg_0001.png,b\n"
                                "img_0001.png,c\n")
    with pytest.raises(KitError, match="groups.csv: 2 problems") as exc:
        run_folds(paths, data, load_config("folds"))
    assert exc.value.problems == ["img_0001.png: listed more than once",
                                  "img_9999.png: not a training image"]
    paths.groups_csv.write_text("sample_index,cluster\n")
    with pytest.raises(KitError, match="missing column"):
        run_folds(paths, data, load_config("folds"))


def test_run_folds_needs_clean_stage(data, tmp_path):
    with pytest.raises(KitError, match="outliers.csv: not found; run ./run.sh clean first"):
        run_folds(Paths.from_root(tmp_path / "fresh"), data, load_config("folds"))
    assert not (tmp_path / "fresh" / "folds" / "folds.csv").exists()


def test_determinism_byte_identical_and_seed_matters(data, tmp_path):
    a, b, c = (make_workdir(tmp_path / name) for name in "abc")
    run_folds(a, data, load_config("folds"), seed=11)
    run_folds(b, load_dataset(data), load_config("folds"), seed=11)  # a loaded Dataset works too
    run_folds(c, data, load_config("folds"), seed=12)
    assert a.folds_csv.read_bytes() == b.folds_csv.read_bytes()
    fa = pd.read_csv(a.folds_csv).fold
    fc = pd.read_csv(c.folds_csv).fold
    assert (fa != fc).any()


def test_overwrite_guard(data, paths, caplog):
    run_folds(paths, data, load_config("folds"), seed=1)
    first = paths.folds_csv.read_bytes()
    run_folds(paths, data, load_config("folds"), seed=1)  # same content: fine
    assert paths.folds_csv.read_bytes() == first
    with pytest.raises(KitError, match="different split") as exc:
        run_folds(paths, data, load_config("folds"), seed=2)
    assert "--force" in str(exc.value) and "invalid" in str(exc.value)
    assert paths.folds_csv.read_bytes() == first  # untouched
    run_folds(paths, data, load_config("folds"), seed=2, force=True)
    assert any("overwriting" in w for w in _warnings(caplog))
    other = make_workdir(paths.root.parent / "other")
    run_folds(other, data, load_config("folds"), seed=2)
    assert paths.folds_csv.read_bytes() == other.folds_csv.read_bytes() != first


def test_cli_folds_and_force(data, tmp_path, capsys):
    paths = make_workdir(tmp_path / "work")
    base = ["folds", "--data", str(data), "--workdir", str(paths.root), "--n-splits", "4"]
    # once end to end in a fresh process; the rest in-process (sklearn's import is slow)
    r = _cli(*base)
    assert r.returncode == 0, r.stderr
    assert "Triple negative" in r.stdout and str(paths.folds_csv) in r.stdout
    first = paths.folds_csv.read_bytes()
    assert pd.read_csv(paths.folds_csv).fold.nunique() == 4
    assert main(base) == 0  # same seed, same file: fine
    capsys.readouterr()
    assert main([*base, "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and "Traceback" not in err
    assert paths.folds_csv.read_bytes() == first
    assert main([*base, "--seed", "7", "--force"]) == 0
    assert paths.folds_csv.read_bytes() != first
    capsys.readouterr()
    assert main([*base[:-1], "1"]) == 2
    assert "at least 2 folds" in capsys.readouterr().err


# --- load_folds ----------------------------------------------------------------------------

def test_load_folds_roundtrip(data, paths):
    written = run_folds(paths, data, load_config("folds"), seed=5)
    df, sha = load_folds(paths)
    assert sha == sha256_file(paths.folds_csv) == folds_hash(paths)
    assert df.fold.dtype == np.int64
    pd.testing.assert_frame_equal(df, written)


def test_load_folds_missing_file(tmp_path):
    paths = Paths.from_root(tmp_path)
    for fn in (load_folds, folds_hash):
        with pytest.raises(KitError, match="no folds file at .*; run ./run.sh folds first") as exc:
            fn(paths)
        assert str(exc.value) == f"no folds file at {paths.folds_csv}; run ./run.sh folds first"


@pytest.mark.parametrize("content, expected", [
    ("sample_index,fold\nimg_0000.png,0\n", "columns are sample_index,fold"),
    ("sample_index,label,fold\n", "no rows"),
    ("sample_index,label,fold\nimg_0000.png,Luminal A,x\n", "line 2: fold 'x'"),
    ("sample_index,label,fold\nimg_0000.png,Luminal A,-1\n", "line 2: fold '-1'"),
    ("sample_index,label,fold\nimg_0000.png,Luminal C,0\n", "line 2: unknown label 'Luminal C'"),
    ("sample_index,label,fold\nimg_0000.png,Luminal A,0\nimg_0000.png,Luminal A,1\n",
     "line 3: img_0000.png listed again"),
    ("sample_index,label,fold\nimg_0000.png,Luminal A,0\nimg_0001.png,Luminal A,2\n",
     "fold(s) 1 have no images"),
])
def test_load_folds_rejects_bad_files(tmp_path, content, expected):
    paths = Paths.from_root(tmp_path)
    paths.folds_dir.mkdir()
    paths.folds_csv.write_text(content)
    with pytest.raises(KitError, match=r"rerun \./run\.sh folds --force") as exc:
        load_folds(paths)
    text = " ".join([str(exc.value), *exc.value.problems])
    assert expected in text and str(paths.folds_csv) in text
    assert "./run.sh folds --force" in text


def test_the_group_column_keeps_groups_whole_and_old_files_still_load(data, paths):
    df = run_folds(paths, data, load_config("folds"), seed=42)
    assert (df.groupby("group").fold.nunique() == 1).all()
    assert df.group.nunique() < len(df)  # the shared-mask pairs share a group
    loaded, _ = load_folds(paths)
    assert list(loaded.group) == list(df.group)
    old = paths.folds_csv.with_name("old.csv")
    df.drop(columns="group").to_csv(old, index=False, lineterminator="\n")
    old.replace(paths.folds_csv)
    loaded, _ = load_folds(paths)
    assert "group" not in loaded.columns and list(loaded.fold) == list(df.fold)


# --- a task's patient groups and classes -------------------------------------------------------

def _patient_data(tmp_path):
    from kit.data.task_synth import write_task_dataset

    root = write_task_dataset(tmp_path / "data", "csv_masks", seed=4, n_train=30, n_test=2,
                              short_side=32, per_patient=(2, 4))
    patients = pd.read_csv(root / "train.csv", dtype=str).set_index("case").patient_id
    return root, patients


def test_patients_never_span_two_folds_and_join_the_other_groups(tmp_path):
    from kit.data.dataset import label_groups
    from kit.data.folds import _grouping_change, grouping_sources
    from kit.task import load_task

    root, patients = _patient_data(tmp_path)
    # a near-duplicate pair across two patients: all their images must then share one group
    a, b = "case_0000", next(c for c, p in patients.items() if p != patients["case_0000"])
    paths = Paths.from_root(tmp_path / "work")
    paths.folds_dir.mkdir(parents=True)
    paths.outliers_csv.write_text("sample_index,reason,score\n")
    write_near(paths, f"1,train,{a} 1,train,{b}")
    df = run_folds(paths, root, load_config("folds", {"n_splits": 3}))
    df["patient"] = patients.loc[df.sample_index].values
    assert (df.groupby("patient").fold.nunique() == 1).all()
    assert (df.groupby("patient").group.nunique() == 1).all()  # what the inner splits read
    linked = df.patient.isin([patients[a], patients[b]])
    assert df.group[linked].nunique() == 1 and df.fold[linked].nunique() == 1
    assert df.group.nunique() == df.patient.nunique() - 1
    config = yaml.safe_load((paths.runs_dir / "folds" / "config.yaml").read_text())
    grouping = config["grouping"]
    assert grouping["sources"] == ["shared_masks", "near_duplicates", "labels_group"]
    assert grouping["labels_group"]["column"] == "patient_id"
    assert grouping["labels_group"]["groups"] == patients.nunique()
    assert config["task"] == "synthetic-csv-masks" and len(config["task_sha256"]) == 64
    # one more patient merged: the grouping change is named on a refused overwrite
    ds = load_dataset(root, task=load_task(None, root))
    merged = {s.id: "P000" if s.group == "P001" else s.group for s in ds.train}
    moved = [type(s)(s.id, s.image, s.mask, s.label, merged[s.id]) for s in ds.train]
    after = grouping_sources(paths, None, {a: "1", b: "1"}, patients=label_groups(moved),
                             task=ds.task, data_root=root)
    assert _grouping_change(paths.runs_dir / "folds" / "config.yaml", after) == \
        "the labels file's group column changed"


def test_the_tasks_classes_make_the_fold_table_and_the_label_check(tmp_path):
    from kit.data.task_synth import CSV_CLASSES

    df = pd.DataFrame({"sample_index": ["a", "b", "c", "d"], "fold": [0, 0, 1, 1],
                       "label": ["Invasive", "Normal", "Benign", "Normal"]})
    table = fold_table(df, 2, CSV_CLASSES)
    assert table.splitlines()[0].split() == ["fold", *CSV_CLASSES, "total"]
    assert table.splitlines()[-1].split() == ["all", "2", "1", "1", "4"]
    paths = Paths.from_root(tmp_path)
    paths.folds_dir.mkdir(parents=True)
    df.assign(group=df.sample_index)[["sample_index", "label", "fold", "group"]].to_csv(
        paths.folds_csv, index=False)
    with pytest.raises(KitError, match="4 problems") as exc:
        load_folds(paths)  # the built-in task's classes
    assert "line 2: unknown label 'Invasive'" in exc.value.problems
    assert load_folds(paths, CSV_CLASSES)[0].label.tolist() == df.label.tolist()


def test_the_folds_command_reads_the_task_of_the_data(tmp_path, capsys):
    root, patients = _patient_data(tmp_path)
    work = tmp_path / "work"
    assert main(["clean", "--data", str(root), "--workdir", str(work)]) == 0
    assert main(["folds", "--data", str(root), "--workdir", str(work), "--n-splits", "3"]) == 0
    folds = pd.read_csv(Paths.from_root(work).folds_csv, dtype=str)
    assert (folds.groupby(patients.loc[folds.sample_index].values).fold.nunique() == 1).all()
    # the same data read without its patient column (seed 4: another split) is refused
    # without --force, naming the source that changed
    (root / "task.yaml").write_text((root / "task.yaml").read_text().replace(
        "group: patient_id", "group: null"))
    code = main(["folds", "--data", str(root), "--workdir", str(work), "--n-splits", "3"])
    assert code == 2
    assert "the labels file's group column removed" in capsys.readouterr().err
