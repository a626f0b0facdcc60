"""Tiny inputs of the cv stage, written straight in the formats of docs/DESIGN.md.

``make_workdir`` writes ``runs/patches/{train,test}/`` and ``folds/folds.csv`` with a class
signal a tiny CNN learns in a few epochs (each class tints its patches a different way), so
tests of training, cv and the demo do not depend on the data stages.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from kit import CLASSES
from kit.paths import Paths

# Per-class RGB offsets added to grey noise: easy to learn, invariant to flips and rotations.
TINTS = np.array([[60, -30, -30], [-30, 60, -30], [-30, -30, 60], [-40, -40, -40]])


def make_patches(n: int, k: int, size: int, labels, rng, signal: float = 1.0) -> np.ndarray:
    base = rng.normal(140, 30, size=(n, k, size, size, 3))
    base += signal * TINTS[np.asarray(labels)][:, None, None, None, :]
    return np.clip(base, 0, 255).astype(np.uint8)


def write_patch_cache(out: Path, ids, labels, array: np.ndarray, key: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "patches.npy", array)
    pd.DataFrame({"sample_index": ids, "label": labels, "fallback": False}).to_csv(
        out / "samples.csv", index=False)
    n, k = array.shape[:2]
    pd.DataFrame({"sample_index": np.repeat(ids, k), "patch": np.tile(np.arange(k), n),
                  "x": 0, "y": 0, "coverage": 1.0}).to_csv(out / "index.csv", index=False)
    (out / "meta.json").write_text(json.dumps({"key": key, "shape": list(array.shape)}))
    (out / "config.yaml").write_text(f"size: {array.shape[2]}\ntop_k: {k}\n")


def make_workdir(root, n_train: int = 24, n_test: int = 8, k: int = 4, size: int = 32,
                 n_folds: int = 3, seed: int = 0, signal: float = 1.0) -> Paths:
    """A work directory with patch caches and a stratified folds file; returns its Paths."""
    rng = np.random.default_rng(seed)
    paths = Paths.from_root(root)
    y = np.arange(n_train) % len(CLASSES)
    ids = [f"img_{i:04d}.png" for i in range(n_train)]
    labels = [CLASSES[c] for c in y]
    write_patch_cache(paths.patches_dir("train"), ids, labels,
                      make_patches(n_train, k, size, y, rng, signal), key=f"train-{seed}")
    yt = rng.integers(0, len(CLASSES), n_test)
    write_patch_cache(paths.patches_dir("test"), [f"img_{i:04d}.png" for i in range(n_test)],
                      [""] * n_test, make_patches(n_test, k, size, yt, rng, signal),
                      key=f"test-{seed}")
    # Stratified: the j-th image of each class goes to fold j % n_folds.
    fold = np.zeros(n_train, dtype=int)
    for c in range(len(CLASSES)):
        members = np.flatnonzero(y == c)
        fold[members] = np.arange(len(members)) % n_folds
    write_folds(paths, ids, labels, fold)
    return paths


def write_folds(paths: Paths, ids, labels, fold) -> None:
    paths.folds_dir.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"sample_index": ids, "label": labels, "fold": fold})
    df.sort_values("sample_index").to_csv(paths.folds_csv, index=False, lineterminator="\n")
