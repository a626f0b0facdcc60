"""Near-duplicate images and masks: perceptual hashes and the groups they form.

Two images that show the same tissue must share a fold, or the split leaks. Byte-identical
mask files are caught by :func:`kit.data.dataset.mask_groups`; this module also catches copies that
were re-encoded, rescaled, recoloured or slightly edited. ``clean`` hashes every image (the
downscaled copy it decodes anyway) and every mask with the DCT perceptual hash of the
``imagehash`` library (``phash``: ``hash_size`` x ``hash_size`` bits). Two images are
near-duplicates when their image hashes differ in at most ``image_distance`` bits, or their
mask hashes in at most ``mask_distance`` bits (``near_duplicates`` in ``kit/conf/clean.yaml``).
Pairs are merged transitively into groups, over train and test together, and written to
``runs/clean/near_duplicates.csv``:

``group,split,sample_index,kind,nearest,distance``
    one row per member of a group of two or more; ``nearest`` (``split/sample_index``) is
    the member it is closest to, ``kind`` (``image`` or ``mask``) which hash matched, and
    ``distance`` the Hamming distance in bits.

``folds`` keeps the training members of each group in one fold (:func:`read_near_duplicates`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from kit.utils import KitError, connected_components, read_csv_columns

FILE_NAME = "near_duplicates.csv"
COLUMNS = ["group", "split", "sample_index", "kind", "nearest", "distance"]
KINDS = ("image", "mask")


def near_duplicates_csv(paths) -> Path:
    """Where ``clean`` writes the near-duplicate groups: ``runs/clean/near_duplicates.csv``."""
    return paths.clean_dir / FILE_NAME


# ---------------------------------------------------------------------------------------------
# Hashes


def image_hash(im: Image.Image, hash_size: int) -> str:
    """Hex phash of an image, or ``""`` for a flat image (all flat images hash alike)."""
    import imagehash  # here: its import (PyWavelets, scipy) is for the hashing path only

    grey = im.convert("L")
    if np.asarray(grey, dtype=np.float32).std() < 1.0:
        return ""
    return str(imagehash.phash(grey, hash_size=hash_size))


def mask_hash(mask: np.ndarray, work_side: int, hash_size: int,
              min_share: float) -> tuple[str, float]:
    """(hex phash, inside share) of a bool mask, hashed on a copy shrunk to ``work_side``.

    Masks covering less than ``min_share`` get ``""``: empty and near-empty masks hash
    alike whatever the image, so comparing them would group unrelated images.
    """
    share = float(mask.mean()) if mask.size else 0.0
    if share < min_share or share >= 1.0:
        return "", share
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    factor = max(1, min(im.size) // max(1, work_side))
    if factor > 1:
        im = im.reduce(factor)  # box average: cheap, and phash shrinks to 32 px anyway
    import imagehash  # here: folds reads this module's file without hashing anything

    return str(imagehash.phash(im, hash_size=hash_size)), share


def _bits(hexes: list[str]) -> np.ndarray:
    """Hex hashes (same length) as an ``n x words`` uint64 array for fast Hamming distances."""
    width = len(hexes[0])
    words = -(-width // 16)
    padded = [h.rjust(words * 16, "0") for h in hexes]
    return np.array([[int(h[16 * w:16 * (w + 1)], 16) for w in range(words)] for h in padded],
                    dtype=np.uint64)


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def close_pairs(hexes: list[str], max_distance: int,
                block: int = 256) -> list[tuple[int, int, int]]:
    """``(i, j, distance)`` for every ``i < j`` whose hashes differ in at most ``max_distance``
    bits.

    Empty hashes (``""``) take part in no pair. Distances are computed in row blocks so that
    memory stays at ``block x n`` whatever the dataset size.
    """
    idx = [i for i, h in enumerate(hexes) if h]
    if max_distance is None or max_distance < 0 or len(idx) < 2:
        return []
    lengths = {len(hexes[i]) for i in idx}
    if len(lengths) > 1:
        raise ValueError(f"hashes of different lengths {sorted(lengths)}; rerun clean")
    bits = _bits([hexes[i] for i in idx])
    pairs = []
    for start in range(0, len(idx), block):
        part = bits[start:start + block]
        xor = np.ascontiguousarray(part[:, None, :] ^ bits[None, :, :])
        # popcount through a byte table: np.bitwise_count needs numpy 2, the kit supports 1.26
        dist = _POPCOUNT[xor.view(np.uint8)].sum(axis=2, dtype=np.int64)
        rows, cols = np.nonzero(dist <= max_distance)
        for r, c in zip(rows.tolist(), cols.tolist()):
            a = start + r
            if a < c:
                pairs.append((idx[a], idx[c], int(dist[r, c])))
    return pairs


# ---------------------------------------------------------------------------------------------
# Groups


def find_groups(table: pd.DataFrame, cfg: dict) -> pd.DataFrame:
    """Near-duplicate groups of the images in ``table``.

    Parameters
    ----------
    table : DataFrame
        One row per image with ``split``, ``sample_index``, ``image_phash``, ``mask_phash``
        (``""`` = not compared).
    cfg : dict
        ``image_distance`` and ``mask_distance`` (bits; negative turns that kind off).

    Returns
    -------
    DataFrame
        :data:`COLUMNS`, one row per member of each group of two or more, sorted by group
        then split (train first) and name. Groups are numbered from 1 in order of their
        first member.
    """
    keys = [f"{sp}/{name}" for sp, name in zip(table["split"], table["sample_index"])]
    edges = []  # (distance, kind rank, i, j)
    for rank, kind in enumerate(KINDS):
        hexes = [str(h) if isinstance(h, str) else "" for h in table[f"{kind}_phash"]]
        edges += [(d, rank, i, j) for i, j, d in close_pairs(hexes, cfg[f"{kind}_distance"])]
    if not edges:
        return pd.DataFrame(columns=COLUMNS)

    nearest: dict[int, tuple] = {}
    for d, rank, i, j in sorted(edges):
        for a, b in ((i, j), (j, i)):
            best = nearest.get(a)
            if best is None or ((d, rank, _order(keys[b]))
                                < (best[0], best[1], _order(keys[best[2]]))):
                nearest[a] = (d, rank, b)

    root = connected_components(nearest, [(i, j) for _, _, i, j in edges])
    members: dict[int, list[int]] = {}
    for i in nearest:
        members.setdefault(root[i], []).append(i)
    groups = sorted((sorted(m, key=lambda i: _order(keys[i])) for m in members.values()),
                    key=lambda m: _order(keys[m[0]]))
    rows = []
    for number, group in enumerate(groups, start=1):
        for i in group:
            d, rank, b = nearest[i]
            rows.append({"group": number, "split": table["split"].iloc[i],
                         "sample_index": table["sample_index"].iloc[i], "kind": KINDS[rank],
                         "nearest": keys[b], "distance": d})
    return pd.DataFrame(rows, columns=COLUMNS)


def _order(key: str) -> tuple:
    split, name = key.split("/", 1)
    return (split != "train", name)


# ---------------------------------------------------------------------------------------------
# Reading the file back (folds)


def read_near_duplicates(path: str | Path, known: set[str] | None = None) -> dict[str, str] | None:
    """Training members of ``near_duplicates.csv`` -> their group (as a string).

    Returns None when the file does not exist (``clean`` not rerun since near-duplicates
    were added); test rows are skipped, as only training images are split into folds.

    Raises
    ------
    KitError
        Unreadable file, missing columns, or training names not in ``known`` (a file from
        another dataset).
    """
    path = Path(path)
    if not path.exists():
        return None
    fix = "rerun ./run.sh clean to rewrite it"
    df = read_csv_columns(path, ("group", "split", "sample_index"), ",".join(COLUMNS), fix)
    train = df[df["split"] == "train"]
    if known is not None:
        stale = sorted(set(train["sample_index"]) - known)
        if stale:
            raise KitError(f"{path}: lists {len(stale)} training image(s) not in the dataset "
                           f"({', '.join(stale[:5])}); {fix} on this dataset")
    return dict(zip(train["sample_index"], train["group"].str.strip()))
