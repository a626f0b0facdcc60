"""Generated datasets in other competitions' layouts, each with its ``task.yaml``.

:mod:`kit.data.synth` writes the AN2DL layout; this module writes the same kind of scans
(its :func:`kit.data.synth.draw`) laid out as other competitions ship them, so that the task
machinery (:mod:`kit.task`, :func:`kit.data.dataset.load_dataset`) is exercised on more than
one layout:

- ``imagefolder``: ``train/<class>/<id>.png``, ``test/<id>.png``, no masks, no labels file;
  ``task.yaml`` is the built-in ``imagefolder`` task's file.
- ``csv``: ``train.csv`` with ``case,tissue,patient_id`` (several images per patient, one
  class per patient), ``train/<id>.png``, ``test/<id>.png``, no masks, three classes of other
  names, scored by balanced accuracy.
- ``csv_masks``: the same with a mask per image, found through ``id_pattern``'s group:
  ``masks/train/mask_<num>.png`` for id ``case_<num>``.

Class ``i`` of a layout is drawn with synth's ``i``-th tumour phenotype, so the classes are
learnable as on the demo data. Small and deterministic: same arguments, same bytes.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from kit import CLASSES
from kit.data.synth import Item, draw, png_bytes, reusable, swap_in
from kit.task import TASK_FILE, TASKS_DIR
from kit.utils import KitError, check_random_state

LAYOUTS = ("imagefolder", "csv", "csv_masks")
META_JSON = "task_synth.json"
CSV_CLASSES = ("Normal", "Benign", "Invasive")


def _csv_task(masks: bool) -> dict:
    task = {
        "name": "synthetic-csv-masks" if masks else "synthetic-csv",
        "classes": list(CSV_CLASSES),
        "labels": {"file": "train.csv", "id": "case", "label": "tissue", "group": "patient_id"},
        "images": {"train": "train/{id}.png", "test": "test/{id}.png"},
        "masks": None,
        "id_pattern": None,
        "metric": "balanced_accuracy",
        "submission": {"id": "case", "label": "tissue"},
        "junk": [],
        "kaggle": None,
    }
    if masks:
        task["id_pattern"] = r"case_(?P<num>\d+)"
        task["masks"] = {"train": "masks/train/mask_{num}.png", "test": "masks/test/mask_{num}.png"}
    return task


def write_task_dataset(root, layout: str, seed: int = 0, n_train: int = 18, n_test: int = 6,
                       short_side: int = 64, per_patient: tuple[int, int] = (1, 3)) -> Path:
    """Write a generated dataset in ``layout`` under ``root`` and return ``root``.

    Parameters
    ----------
    root : path
        Folder to create. A rerun with the same arguments reuses it; a folder this function
        wrote with other arguments is replaced; any other non-empty folder is refused.
    layout : {"imagefolder", "csv", "csv_masks"}
        See the module's docstring.
    seed : int
        Same seed and arguments give byte-identical files.
    n_train, n_test : int
        Training and test images (every class gets training images when ``n_train`` allows).
    short_side : int
        Short image side in pixels (>= 32); the long side is 1.2-2x that.
    per_patient : (int, int)
        Least and most images of one patient (``csv`` layouts).
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise KitError(f"task_synth: layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")
    lo, hi = per_patient
    if n_train < 1 or n_test < 0 or short_side < 32 or not 1 <= lo <= hi:
        raise KitError(f"task_synth: need n_train >= 1, n_test >= 0, short_side >= 32 and "
                       f"1 <= per_patient[0] <= per_patient[1] (got {n_train}, {n_test}, "
                       f"{short_side}, {per_patient})")
    params = {"layout": layout, "seed": seed, "n_train": n_train, "n_test": n_test,
              "short_side": short_side, "per_patient": [lo, hi]}
    if reusable(root, params, META_JSON):
        return root
    return swap_in(root, params, META_JSON,
                   lambda tmp: _write(tmp, layout, seed, n_train, n_test, short_side, (lo, hi)))


def _write(root: Path, layout: str, seed: int, n_train: int, n_test: int, short_side: int,
           per_patient: tuple[int, int]) -> None:
    rng = check_random_state([seed, 23])
    if layout == "imagefolder":
        classes = tuple(yaml.safe_load((TASKS_DIR / "imagefolder.yaml").read_text())["classes"])
    else:
        classes = CSV_CLASSES
    # Patients in turn through the classes (shuffled), so that every class has images.
    sizes, patients = [], []
    while sum(sizes) < n_train:
        sizes.append(min(int(rng.integers(per_patient[0], per_patient[1] + 1)),
                         n_train - sum(sizes)))
    order = rng.permutation(len(sizes))
    patient_class = {int(p): int(k % len(classes)) for k, p in enumerate(order)}
    for p, size in enumerate(sizes):
        patients += [p] * size
    train_y = [patient_class[p] for p in patients]
    test_y = rng.integers(0, len(classes), n_test).tolist()
    shape = [(short_side, round(short_side * rng.uniform(1.2, 2.0)))
             for _ in range(n_train + n_test)]

    rows = []
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        k = train_y[i] if split == "train" else test_y[i - n_train]
        item = Item(split, i, CLASSES[k], "real", size=shape[i])
        img, mask = draw(item, seed)
        name = f"case_{i:04d}"
        if layout == "imagefolder":
            image = (root / "train" / classes[k] / f"{name}.png" if split == "train"
                     else root / "test" / f"{name}.png")
        else:
            image = root / split / f"{name}.png"
        _save(image, img)
        if layout == "csv_masks":
            _save(root / "masks" / split / f"mask_{i:04d}.png", mask)
        if split == "train":
            rows.append({"case": name, "tissue": classes[k], "patient_id": f"P{patients[i]:03d}"})
    if layout == "imagefolder":
        shutil.copyfile(TASKS_DIR / "imagefolder.yaml", root / TASK_FILE)
        for c in classes:  # a class drawn for no image still gets its (empty) folder
            (root / "train" / c).mkdir(parents=True, exist_ok=True)
        (root / "test").mkdir(exist_ok=True)
        return
    pd.DataFrame(rows, columns=["case", "tissue", "patient_id"]).to_csv(
        root / "train.csv", index=False, lineterminator="\n")
    (root / "test").mkdir(exist_ok=True)
    header = (f"# Generated by kit.data.task_synth (layout {layout}); docs/tasks.md explains "
              "the keys.\n")
    (root / TASK_FILE).write_text(header + yaml.safe_dump(_csv_task(layout == "csv_masks"),
                                                          sort_keys=False))


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(arr))
