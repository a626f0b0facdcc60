"""Windows spread over mask regions: the ``per_region`` way of choosing an image's K windows.

``top_k`` (:func:`kit.data.cutting.pick_windows`) keeps the K windows with the most mask
coverage, which can all come from the largest region. Here the mask's connected regions
(8-connected, :func:`scipy.ndimage.label`, numbered 1, 2, ... in raster order of their first
pixel) each get windows in proportion to their area, at least one per region of at least
``min_region_px`` pixels, and within a region windows are ranked by that region's coverage.
Windows stay at native resolution, on the same stride grid as ``top_k``.

Every window carries a region id: the region it was chosen for, or (for ``top_k`` windows)
the region with the most pixels inside it; 0 when it shows no mask pixel (tissue windows,
the empty-mask fallback).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from kit.data.windows import select_windows, window_scores, window_starts

_EIGHT = np.ones((3, 3), dtype=bool)  # diagonal neighbours join a region


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected regions of a bool mask.

    Returns
    -------
    labels : int32 array H x W
        0 outside the mask, 1..n inside (raster order of each region's first pixel).
    areas : int64 array of length n
        Pixels of region ``i + 1``.
    """
    mask = np.asarray(mask, dtype=bool)
    labels = np.zeros(mask.shape, dtype=np.int32)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return labels, np.zeros(0, dtype=np.int64)
    # Only the mask's bounding box is labelled: masks cover a small part of a scan, and
    # labelling the whole scan cost several times the window scoring.
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    n = ndimage.label(mask[box], structure=_EIGHT, output=labels[box])
    areas = np.bincount(labels[box].ravel(), minlength=n + 1)[1:].astype(np.int64)
    return labels, areas


def allot(areas, k: int, min_px: int) -> np.ndarray:
    """How many of ``k`` windows each region gets.

    Regions of at least ``min_px`` pixels are eligible (when none is, the largest one is).
    With ``k`` or more eligible regions, the ``k`` largest get one each. Otherwise each gets
    one and the rest are shared in proportion to area by largest remainder. Ties go to the
    larger region, then to the lower id, so the result is deterministic.
    """
    areas = np.asarray(areas, dtype=np.int64)
    counts = np.zeros(len(areas), dtype=np.int64)
    if len(areas) == 0 or k < 1:
        return counts
    eligible = np.flatnonzero(areas >= min_px)
    if len(eligible) == 0:
        eligible = np.array([int(np.argmax(areas))])
    # larger area first, then lower id (lexsort: last key first)
    order = eligible[np.lexsort((eligible, -areas[eligible]))]
    if len(order) >= k:
        counts[order[:k]] = 1
        return counts
    counts[order] = 1
    rest = k - len(order)
    share = rest * areas[order] / float(areas[order].sum())
    base = np.floor(share).astype(np.int64)
    counts[order] += base
    left = rest - int(base.sum())
    remainder = share - base
    # largest remainder first; ties keep the (area, id) order, as a stable sort does
    bonus = order[np.argsort(-remainder, kind="stable")[:left]]
    counts[bonus] += 1
    return counts


def region_windows(labels: np.ndarray, areas, size: int, stride: int, k: int, min_px: int,
                   mask_cov: np.ndarray, then: np.ndarray | None = None):
    """Flat grid indices and region ids of the ``k`` windows of ``per_region``.

    Parameters
    ----------
    labels, areas : from :func:`label_regions` (at least one region)
    size, stride, k : int
        Window side, step and number of windows.
    min_px : int
        Least area of a region that is sure to get a window.
    mask_cov : float array, the window grid
        Whole-mask coverage of every window (:func:`kit.data.windows.window_scores`): breaks
        ties within a region and ranks the leftover windows.
    then : float array, the window grid, optional
        Tissue coverage: breaks the leftover windows' remaining ties.

    Returns
    -------
    flat : int64 array of length k
        Row-major window indices: round robin over the regions (each region's best, then each
        one's second, ...; regions by id), then leftovers by whole-mask coverage.
    region : int64 array of length k
        The region each window was chosen for; leftovers: their majority region, 0 if none.
    """
    counts = allot(areas, k, min_px)
    taken: set[int] = set()
    picks: list[list[int]] = []
    ids = [int(r) for r in np.flatnonzero(counts)]
    grids = {}
    for r in ids:
        cov = window_scores(labels == r + 1, size, stride)[0]
        grids[r] = cov
        ranked = select_windows(cov, cov.size, mask_cov)  # whole grid, region's best first
        mine = [int(i) for i in ranked if cov.flat[i] > 0 and int(i) not in taken]
        picks.append(mine[:counts[r]])
        taken.update(picks[-1])
    flat, region = [], []
    for rank in range(max((len(p) for p in picks), default=0)):
        for r, p in zip(ids, picks):
            if rank < len(p):
                flat.append(p[rank])
                region.append(r + 1)
    if len(flat) < k:  # a region with fewer windows than its share: fill by mask coverage
        ranked = select_windows(mask_cov, mask_cov.size, then)
        extra = [int(i) for i in ranked if int(i) not in taken][:k - len(flat)]
        flat += extra
        region += [int(majority_region(labels, i, size, stride, mask_cov.shape)) for i in extra]
    if len(flat) < k:  # a grid smaller than k windows: repeat, as select_windows does
        flat, region = np.resize(flat, k).tolist(), np.resize(region, k).tolist()
    return np.asarray(flat, dtype=np.int64), np.asarray(region, dtype=np.int64)


def majority_region(labels: np.ndarray, flat: int, size: int, stride: int, grid: tuple) -> int:
    """The region with the most pixels in window ``flat`` of the grid (lowest id on a tie), 0
    when the window holds no mask pixel."""
    h, w = labels.shape
    iy, ix = divmod(int(flat), grid[1])
    y = int(window_starts(h, size, stride)[iy])
    x = int(window_starts(w, size, stride)[ix])
    counts = np.bincount(labels[y:y + size, x:x + size].ravel())
    counts[0] = 0
    return int(np.argmax(counts)) if counts.max(initial=0) > 0 else 0
