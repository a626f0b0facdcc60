"""The window grid of the patches stage: start offsets, mask coverage of every window, ranking.

Shared by ``select: top_k`` (:mod:`kit.data.cutting`) and ``select: per_region``
(:mod:`kit.data.regions`).
"""
from __future__ import annotations

import numpy as np

from kit.utils import KitError


def window_starts(length: int, size: int, stride: int) -> np.ndarray:
    """Start offsets of the windows along one axis of ``length`` pixels.

    ``0, stride, 2*stride, ...`` while the window fits, plus one last window flush with the
    far edge when ``(length - size) % stride != 0``, so that every pixel is covered. An axis
    shorter than ``size`` gets the single start 0 (the image is padded, see
    :func:`window_scores`).
    """
    if size < 1 or stride < 1:
        raise KitError(f"patch size and stride must be >= 1 (got size={size}, stride={stride})")
    if length <= size:
        return np.zeros(1, dtype=np.int64)
    starts = np.arange(0, length - size + 1, stride, dtype=np.int64)
    if starts[-1] != length - size:
        starts = np.append(starts, length - size)
    return starts


def window_scores(mask: np.ndarray, size: int, stride: int):
    """Mask coverage of every ``size x size`` window of a stride-``stride`` grid.

    Parameters
    ----------
    mask : bool array, H x W
        Region of interest (or tissue, for the fallback).
    size, stride : int
        Window side and step in pixels. The grid is described by :func:`window_starts`:
        it covers the whole image, the last row/column of windows flush with the
        bottom/right edge. A mask smaller than ``size`` along an axis is treated as padded
        with ``False`` on the bottom/right up to ``size``.

    Returns
    -------
    coverage : float64 array, len(ys) x len(xs)
        Share of mask pixels in the window at ``(ys[i], xs[j])``, in ``[0, 1]``.
    xs, ys : int64 arrays
        Window left and top offsets in image pixels.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    h, w = mask.shape
    ys, xs = window_starts(h, size, stride), window_starts(w, size, stride)
    # Summed-area table S[r, c] = mask[:r, :c].sum(), needed only at window edges: sum the
    # mask over the blocks between consecutive edges (row bands, then column bands) and
    # cumulate the small block table; one pass over the mask, no H x W table is built.
    # Extra edges every 255 rows keep each band short enough for _band_sums.
    rows = np.unique(np.concatenate([ys, np.minimum(ys + size, h), np.arange(0, h, 255)]))
    cols = np.unique(np.concatenate([xs, np.minimum(xs + size, w)]))
    s = np.zeros((len(rows), len(cols)), dtype=np.int64)
    if len(rows) > 1 and len(cols) > 1:
        bands = _band_sums(mask, rows)  # (len(rows) - 1) x W
        blocks = np.add.reduceat(bands[:, : cols[-1]], cols[:-1], axis=1, dtype=np.int64)
        s[1:, 1:] = blocks.cumsum(axis=0).cumsum(axis=1)
    r0, r1 = np.searchsorted(rows, ys), np.searchsorted(rows, np.minimum(ys + size, h))
    c0, c1 = np.searchsorted(cols, xs), np.searchsorted(cols, np.minimum(xs + size, w))
    counts = (s[np.ix_(r1, c1)] - s[np.ix_(r0, c1)] - s[np.ix_(r1, c0)] + s[np.ix_(r0, c0)])
    return counts / float(size * size), xs, ys


def _band_sums(mask: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Column sums of the row bands ``[rows[i], rows[i+1])`` of a bool mask, as uint8.

    Eight columns are added at once as the byte lanes of one uint64 (bool bytes are 0/1,
    and no lane can carry into the next while a band is at most 255 rows): about 6x faster
    than ``np.add.reduceat`` on bytes, which matters because decoding is the only other cost.
    """
    if np.diff(rows).max(initial=0) > 255:
        raise ValueError("row bands must be at most 255 rows")
    h, w = mask.shape
    top = mask[: rows[-1]]
    if w % 8 == 0 and top.flags.c_contiguous:
        lanes = top.view(np.uint8)
    else:  # pad the width to a multiple of 8 columns of zeros
        lanes = np.zeros((rows[-1], -(-w // 8) * 8), dtype=np.uint8)
        lanes[:, :w] = top
    sums = np.add.reduceat(lanes.view(np.uint64), rows[:-1], axis=0)
    return sums.view(np.uint8)[:, :w]


def select_windows(scores: np.ndarray, k: int, then: np.ndarray | None = None) -> np.ndarray:
    """Flat (row-major) indices of the ``k`` best windows, best first.

    Windows are ranked by ``scores``, equal scores by ``then`` (same shape, optional), and
    remaining ties by position: top row first, then left column (a stable sort of the
    row-major grid). When the grid has fewer than ``k`` windows the ranking repeats
    cyclically (best, 2nd, ..., best, 2nd, ...), so every image yields exactly ``k`` patches.
    """
    if k < 1:
        raise KitError(f"top_k must be >= 1 (got {k})")
    primary = -np.asarray(scores, dtype=np.float64).ravel()
    if then is None:
        order = np.argsort(primary, kind="stable")
    else:  # lexsort is stable and sorts by its last key first
        order = np.lexsort((-np.asarray(then, dtype=np.float64).ravel(), primary))
    if len(order) < k:
        order = np.resize(order, k)
    return order[:k]
