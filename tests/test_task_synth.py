"""kit.data.task_synth: generated datasets in other layouts load through their task.yaml."""
from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest

from kit.data.dataset import label_groups, load_dataset, read_image, read_mask
from kit.data.task_synth import CSV_CLASSES, LAYOUTS, write_task_dataset
from kit.task import load_task
from kit.utils import KitError


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    return {layout: write_task_dataset(base / layout, layout, seed=3, n_train=15, n_test=5)
            for layout in LAYOUTS}


def _load(root):
    task = load_task(None, root)  # the data folder's task.yaml
    return task, load_dataset(root, task=task)


def test_imagefolder_layout(made):
    root = made["imagefolder"]
    task, ds = _load(root)
    assert task == load_task("imagefolder")  # the built-in task's file, copied
    assert task.source == root / "task.yaml" and not task.builtin
    assert len(ds.train) == 15 and len(ds.test) == 5 and ds.task is task
    for s in ds.train:
        assert s.image == root / "train" / s.label / f"{s.id}.png"
        assert s.mask is None and s.group is None and s.label in task.classes
    assert set(Counter(s.label for s in ds.train)) == set(task.classes)
    assert [s.id for s in ds.test] == [f"case_{i:04d}" for i in range(15, 20)]
    assert all(s.label is None and s.mask is None for s in ds.test)
    assert read_image(ds.test[0].image).shape[0] == 64


@pytest.mark.parametrize("layout", ["csv", "csv_masks"])
def test_csv_layouts(made, layout):
    root = made[layout]
    task, ds = _load(root)
    assert task.classes == CSV_CLASSES and task.metric == "balanced_accuracy"
    assert task.labels.group == "patient_id" and task.has_masks == (layout == "csv_masks")
    table = pd.read_csv(root / "train.csv", dtype=str)
    assert list(table.columns) == ["case", "tissue", "patient_id"]
    assert [s.id for s in ds.train] == list(table.case)
    assert [s.label for s in ds.train] == list(table.tissue)
    assert [s.group for s in ds.train] == list(table.patient_id)
    assert len(ds.test) == 5 and all(s.label is None and s.group is None for s in ds.test)
    per_patient = table.groupby("patient_id").agg(n=("case", "size"), labels=("tissue", "nunique"))
    assert per_patient.n.max() > 1 and (per_patient.labels == 1).all()
    groups = label_groups(ds.train)
    assert len(set(groups.values())) == len(per_patient)
    first = table.groupby("patient_id").case.min()
    assert all(groups[c] == first[p] for c, p in zip(table.case, table.patient_id))
    if layout == "csv_masks":
        assert task.id_groups == ("num",)
        for s in ds.train + ds.test:
            split = "train" if s.label else "test"
            assert s.mask == root / "masks" / split / f"mask_{s.id.split('_')[1]}.png"
            assert read_mask(s.mask).shape == read_image(s.image).shape[:2]
            assert read_mask(s.mask).any()
    else:
        assert all(s.mask is None for s in ds.train + ds.test)


def test_same_seed_same_bytes_and_reuse(tmp_path, made):
    a = write_task_dataset(tmp_path / "a", "csv_masks", seed=3, n_train=15, n_test=5)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(made["csv_masks"]) for p in made["csv_masks"].rglob("*")
                           if p.is_file())
    assert all((a / f).read_bytes() == (made["csv_masks"] / f).read_bytes() for f in files)
    stamp = (a / "train.csv").stat().st_mtime_ns
    write_task_dataset(a, "csv_masks", seed=3, n_train=15, n_test=5)  # same arguments: reused
    assert (a / "train.csv").stat().st_mtime_ns == stamp
    other = write_task_dataset(a, "csv_masks", seed=4, n_train=15, n_test=5)  # replaced
    assert (other / "train.csv").read_bytes() != (made["csv_masks"] / "train.csv").read_bytes()


def test_refuses_bad_arguments_and_foreign_folders(tmp_path):
    with pytest.raises(KitError, match="layout must be one of imagefolder, csv, csv_masks"):
        write_task_dataset(tmp_path / "x", "coco")
    with pytest.raises(KitError, match="need n_train >= 1"):
        write_task_dataset(tmp_path / "x", "csv", n_train=0)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(KitError, match="exists and is not a generated dataset"):
        write_task_dataset(tmp_path / "mine", "csv")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
