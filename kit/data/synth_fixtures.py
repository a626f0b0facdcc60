"""In-memory fixtures for tests and benches that skip the data stages: patch arrays whose class
is a colour tint, a work directory with patch caches and a folds file in the formats of
``docs/DESIGN.md``, and patch embeddings with a class signal."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from kit import CLASSES
from kit.data.synth_plan import CLEAN_COUNTS, check_counts
from kit.paths import Paths
from kit.utils import check_random_state

# Per-class RGB offsets added to grey noise: easy to learn, invariant to flips and rotations.
TINTS = np.array([[60, -30, -30], [-30, 60, -30], [-30, -30, 60], [-40, -40, -40]])


def tinted_patches(n: int, k: int, size: int, labels, rng, signal: float = 1.0) -> np.ndarray:
    """Patches (uint8 ``n x k x size x size x 3``): grey noise plus a class tint x ``signal``.

    ``labels`` are class indices; a tiny CNN learns the tint in a few epochs.
    """
    rng = check_random_state(rng)
    base = rng.normal(140, 30, size=(n, k, size, size, 3))
    base += signal * TINTS[np.asarray(labels)][:, None, None, None, :]
    return np.clip(base, 0, 255).astype(np.uint8)


def stratified_folds(y, n_folds: int, rng=None) -> np.ndarray:
    """Fold per row: each class's rows dealt round-robin (shuffled first when ``rng`` is given)."""
    y = np.asarray(y)
    fold = np.zeros(len(y), dtype=np.int64)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if rng is not None:
            members = check_random_state(rng).permutation(members)
        fold[members] = np.arange(len(members)) % n_folds
    return fold


def write_patch_cache(out: Path, ids, labels, array: np.ndarray, key: str) -> None:
    """A patch cache folder as ``kit.data.patches`` writes it (``patches.npy``, CSVs, meta).

    Each window lies wholly in its image's one mask region: coverage 1, region 1.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "patches.npy", array)
    pd.DataFrame({"sample_index": ids, "label": labels, "fallback": False}).to_csv(
        out / "samples.csv", index=False)
    n, k = array.shape[:2]
    index = pd.DataFrame({"sample_index": np.repeat(ids, k), "patch": np.tile(np.arange(k), n),
                          "x": 0, "y": 0, "coverage": 1.0, "region": 1})
    index.to_csv(out / "index.csv", index=False)
    (out / "meta.json").write_text(json.dumps({"key": key, "shape": list(array.shape)}))
    (out / "config.yaml").write_text(f"size: {array.shape[2]}\ntop_k: {k}\n")


def write_folds(paths, ids, labels, fold) -> None:
    """``folds/folds.csv`` (sorted by sample_index) as ``kit.data.folds`` writes it."""
    paths.folds_dir.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"sample_index": ids, "label": labels, "fold": fold})
    df.sort_values("sample_index").to_csv(paths.folds_csv, index=False, lineterminator="\n")


def write_patch_workdir(root, n_train: int = 24, n_test: int = 8, k: int = 4, size: int = 32,
                        n_folds: int = 3, seed: int = 0, signal: float = 1.0):
    """A work directory with tinted patch caches and a stratified folds file; its ``Paths``.

    Training labels cycle through the classes (balanced); test labels are random. The cv
    stage runs on it without the data stages.
    """
    rng = np.random.default_rng(seed)
    paths = Paths.from_root(root)
    y = np.arange(n_train) % len(CLASSES)
    ids = [f"img_{i:04d}.png" for i in range(n_train)]
    labels = [CLASSES[c] for c in y]
    write_patch_cache(paths.patches_dir("train", size), ids, labels,
                      tinted_patches(n_train, k, size, y, rng, signal), key=f"train-{seed}")
    yt = rng.integers(0, len(CLASSES), n_test)
    write_patch_cache(paths.patches_dir("test", size), [f"img_{i:04d}.png" for i in range(n_test)],
                      [""] * n_test, tinted_patches(n_test, k, size, yt, rng, signal),
                      key=f"test-{seed}")
    write_folds(paths, ids, labels, stratified_folds(y, n_folds))
    return paths


def embeddings(n: int, k: int, n_views: int, dim: int, seed: int = 0,
               counts: dict | None = None, signal: float = 0.06):
    """Patch embeddings with a class signal: ``(x float16 n x k x n_views x dim, y)``.

    Class means (scale ``signal``) plus a per-image offset plus per-patch noise; labels drawn
    with the shares of ``counts`` (default: the clean v2 training counts).
    """
    rng = np.random.default_rng(seed)
    counts = check_counts(CLEAN_COUNTS if counts is None else counts)
    share = np.array([counts[c] for c in CLASSES], dtype=float)
    y = rng.choice(len(CLASSES), size=n, p=share / share.sum())
    means = rng.normal(0, signal, (len(CLASSES), dim))
    x = (means[y][:, None, None, :] + rng.normal(0, 0.5, (n, 1, 1, dim))
         + rng.normal(0, 1.0, (n, k, n_views, dim))).astype(np.float16)
    return x, y
