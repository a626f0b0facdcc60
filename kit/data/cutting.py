"""One image's patches, as the patches stage cuts them: its ``k`` windows picked by mask
coverage (:func:`pick_windows`), cut at native resolution (:func:`cut_windows`), and the
worker that does both from the files on disk, stain normalisation included
(:func:`extract_file`).
"""
from __future__ import annotations

import time

import numpy as np
from PIL import Image

from kit.data.dataset import to_rgb_array
from kit.data.regions import label_regions, majority_region, region_windows
from kit.data.stain import apply_payload
from kit.data.windows import select_windows, window_scores
from kit.utils import KitError


def tissue_mask(image: np.ndarray, threshold: int) -> np.ndarray:
    """Non-background pixels: channel minimum below ``threshold`` (the background is light grey)."""
    # two elementwise minimums: image.min(axis=2) over the length-3 axis is ~25x slower
    return np.minimum(np.minimum(image[..., 0], image[..., 1]), image[..., 2]) < threshold


def _crop(image, x: int, y: int, size: int, pad_value: int) -> np.ndarray:
    """``size x size x 3`` uint8 crop at (x, y) of an RGB array or a loaded PIL image.

    The part outside the image (only for images smaller than ``size``) is ``pad_value``.
    """
    if isinstance(image, np.ndarray):
        region = image[y:y + size, x:x + size]
    else:
        w, h = image.size  # cropping the PIL image converts only the crop, not the whole scan
        region = to_rgb_array(image.crop((x, y, min(x + size, w), min(y + size, h))))
    if region.shape[:2] == (size, size):
        return region
    out = np.full((size, size, 3), pad_value, dtype=np.uint8)
    out[: region.shape[0], : region.shape[1]] = region
    return out


def _rgb(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    return to_rgb_array(image)


def pick_windows(mask: np.ndarray, size: int, stride: int, k: int, image=None,
                 tissue_threshold: int = 200, select: str = "top_k", min_region_px: int = 1):
    """Positions of the ``k`` windows of one image to cut, best first, and their mask regions.

    Parameters
    ----------
    mask : bool array H x W
        Region of interest. If it is empty, windows are ranked by tissue coverage of
        ``image`` instead (pixels whose channel minimum is below ``tissue_threshold``).
        If fewer than ``k`` windows touch the mask, windows of equal mask coverage (the
        zeros) are ranked by tissue coverage, so that the last patches show tissue rather
        than background.
    size, stride, k : int
        Window side, step and number of windows kept (see
        :func:`kit.data.windows.select_windows`).
    image : uint8 array H x W x 3 or PIL image, optional
        Needed for the tissue ranking; without it ties break by position only.
    select : {"top_k", "per_region"}
        ``top_k`` keeps the windows with the most mask; ``per_region`` spreads them over the
        mask's connected regions (:func:`kit.data.regions.region_windows`; regions under
        ``min_region_px`` pixels are not sure to get one).

    Returns
    -------
    xs, ys : int64 arrays of length k
        Top-left corners in image pixels.
    coverage : float64 array of length k
        Share of mask (or, for the fallback, tissue) pixels in each window.
    fallback : bool
        True when the mask was empty and tissue coverage was used.
    region : int64 array of length k
        The mask region a window was chosen for (top_k: the one with most pixels in it), 0 for
        a window without mask pixels.
    """
    mask = np.asarray(mask, dtype=bool)
    fallback = not mask.any()
    if fallback:
        if image is None:
            raise ValueError("empty mask: the image is needed for the tissue fallback")
        tissue = tissue_mask(_rgb(image), tissue_threshold)
        coverage, xs, ys = window_scores(tissue, size, stride)
    else:
        coverage, xs, ys = window_scores(mask, size, stride)
    then = None
    if not fallback and image is not None and np.count_nonzero(coverage) < k:
        # Only then is the whole scan converted: most images have k mask windows.
        then = window_scores(tissue_mask(_rgb(image), tissue_threshold), size, stride)[0]
    if fallback:
        best = select_windows(coverage, k, then)
        region = np.zeros(k, dtype=np.int64)
    else:
        labels, areas = label_regions(mask)
        if select == "per_region":
            best, region = region_windows(labels, areas, size, stride, k, min_region_px,
                                          coverage, then)
        else:
            best = select_windows(coverage, k, then)
            region = np.array([majority_region(labels, i, size, stride, coverage.shape)
                               for i in best], dtype=np.int64)
    iy, ix = np.divmod(best, len(xs))
    return xs[ix], ys[iy], coverage[iy, ix], fallback, region


def cut_windows(image, xs, ys, size: int, pad_value: int = 255) -> np.ndarray:
    """``len(xs) x size x size x 3`` uint8 crops of ``image`` at ``(xs[i], ys[i])``."""
    patches = np.empty((len(xs), size, size, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(zip(xs, ys)):
        patches[i] = _crop(image, int(x), int(y), size, pad_value)
    return patches


def _rows(xs, ys, coverage, fallback: bool, region) -> list[dict]:
    return [{"patch": i, "x": int(x), "y": int(y), "coverage": float(c), "fallback": fallback,
             "region": int(r)} for i, (x, y, c, r) in enumerate(zip(xs, ys, coverage, region))]


def _bool_mask(im) -> np.ndarray:
    """A decoded PIL mask as bool H x W; the same rule as :func:`kit.data.dataset.read_mask`."""
    arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    return arr > 0


def extract_file(task):
    """Worker: decode one image/mask pair from disk and cut its patches.

    ``task`` is ``(image_path, mask_path, cfg)``; ``mask_path`` None (a task without masks)
    is an empty mask, so the windows are ranked by tissue coverage (the fallback of
    :func:`pick_windows`). ``cfg`` is a resolved patches.yaml; ``cfg["_stain"]``, when present, is a
    :func:`kit.data.stain.stain_payload` to normalise the patches with. Returns ``(patches, rows,
    seconds)`` with ``seconds`` = ``{"decode", "score", "crop", "stain"}`` (for the
    benchmark) and each row's ``stain_normalised`` (None when off, False when the image had
    too little tissue to estimate its stains and was left as it is). Only the small patch
    array crosses the process boundary, never the decoded scan.
    """
    image_path, mask_path, cfg = task
    size = cfg["size"]
    im = None
    try:
        t0 = time.perf_counter()
        if mask_path is None:
            im = Image.open(image_path)
            im.load()
            t1 = time.perf_counter()
            mask = np.zeros(im.size[::-1], dtype=bool)
        else:
            with Image.open(mask_path) as mk:
                mk.load()
                im = Image.open(image_path)
                im.load()
                t1 = time.perf_counter()
                mask = _bool_mask(mk)
        if mask.shape != im.size[::-1]:
            raise KitError(f"{image_path}: image is {im.size[0]}x{im.size[1]} but its mask is "
                           f"{mask.shape[1]}x{mask.shape[0]}; they must match")
        xs, ys, cov, fallback, region = pick_windows(
            mask, size, cfg["stride"], cfg["top_k"], im, cfg["tissue_threshold"],
            cfg["select"], int(cfg["min_region_px"]))
        t2 = time.perf_counter()
        patches = cut_windows(im, xs, ys, size, cfg["pad_value"])
        t3 = time.perf_counter()
        normalised = None  # stain normalisation off
        if cfg.get("_stain") is not None:
            patches, normalised = apply_payload(patches, cfg["_stain"])
        t4 = time.perf_counter()
    except KitError:
        raise
    except Exception as exc:  # PIL raises many types for broken files
        raise KitError(f"{image_path}: cannot cut patches ({type(exc).__name__}: {exc}); "
                       "run ./run.sh validate on the dataset") from None
    finally:
        if im is not None:
            im.close()
    seconds = {"decode": t1 - t0, "score": t2 - t1, "crop": t3 - t2, "stain": t4 - t3}
    rows = _rows(xs, ys, cov, fallback, region)
    for row in rows:
        row["stain_normalised"] = normalised
    return patches, rows, seconds
