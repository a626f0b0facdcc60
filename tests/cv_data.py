"""Tiny inputs of the cv stage, written straight in the formats of docs/DESIGN.md.

Thin names over :mod:`kit.data.synth` (the kit's one synthetic-data generator):
``make_workdir`` writes ``runs/patches/<size>px/{train,test}/`` and ``folds/folds.csv`` with a
class signal a tiny CNN learns in a few epochs (each class tints its patches a different way),
so tests of training, cv and the demo do not depend on the data stages.
"""
from __future__ import annotations

from kit.data.synth import TINTS, tinted_patches, write_folds, write_patch_cache  # noqa: F401
from kit.data.synth import write_patch_workdir as make_workdir  # noqa: F401

make_patches = tinted_patches


def make_task_workdir(root, data_root, n_folds: int = 3, k: int = 4, size: int = 32,
                      seed: int = 0, n_train: int = 24, n_test: int = 6):
    """Another competition's inputs of the cv stage: ``kit.data.task_synth``'s ``csv`` layout
    (three classes, balanced accuracy, patients in ``labels.group``) under ``data_root``, and
    under ``root`` tinted patch caches and a folds file written straight with its classes,
    each patient's images in one fold and one ``group``. Returns ``(paths, data)``."""
    import numpy as np
    import pandas as pd

    from kit.data.task_synth import write_task_dataset
    from kit.paths import Paths
    from kit.task import as_data

    data = as_data(str(write_task_dataset(data_root, "csv", seed, n_train=n_train,
                                          n_test=n_test)))
    task, labels = data.task, data.task.labels
    table = pd.read_csv(data.root / labels.file, dtype=str, keep_default_na=False)
    ids, names, patients = (table[c].tolist() for c in (labels.id, labels.label, labels.group))
    y = np.array([task.classes.index(c) for c in names])
    rng = np.random.default_rng(seed)
    paths = Paths.from_root(root)
    write_patch_cache(paths.patches_dir("train", size), ids, names,
                      tinted_patches(len(ids), k, size, y, rng), key=f"train-{seed}")
    write_patch_cache(paths.patches_dir("test", size), [f"test_{i:04d}" for i in range(n_test)],
                      [""] * n_test, tinted_patches(n_test, k, size, rng.integers(0, 3, n_test),
                                                    rng), key=f"test-{seed}")
    # Each class's patients dealt round-robin over the folds; group = the patient's first id.
    first = {p: min(i for i, q in zip(ids, patients) if q == p) for p in set(patients)}
    order = {}
    for c in task.classes:
        for j, p in enumerate(sorted({p for p, n in zip(patients, names) if n == c})):
            order[p] = j % n_folds
    folds = pd.DataFrame({"sample_index": ids, "label": names,
                          "fold": [order[p] for p in patients],
                          "group": [first[p] for p in patients]})
    paths.folds_dir.mkdir(parents=True, exist_ok=True)
    folds.sort_values("sample_index").to_csv(paths.folds_csv, index=False, lineterminator="\n")
    return paths, data
