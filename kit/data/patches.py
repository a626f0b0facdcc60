"""Mask-guided patches: K mask-coverage windows of every image, cached per split and size.

A ``size x size`` window slides with ``stride`` over each image; its score is the share of
mask pixels inside it, computed from a summed-area table sampled at the window edges (no
per-window Python loop). ``select: top_k`` keeps the ``top_k`` best windows; ties go to the
window with more tissue when fewer than ``top_k`` windows touch the mask, then to the
top-left one. ``select: per_region`` spreads them over the mask's connected regions
(:mod:`kit.data.regions`). The windows are cut at native resolution and stored in one uint8
array per split, ``runs/patches/<size>px/<split>/patches.npy`` (``N x K x P x P x 3``), beside
``samples.csv``, ``index.csv`` (with each window's mask ``region``), ``meta.json`` and
``config.yaml``; caches of several sizes coexist (:mod:`kit.data.caches` picks one).

Optionally (``stain_norm.method: macenko``), each image's patches are Macenko-normalised
to a reference stain (:mod:`kit.data.stain`) in the same worker, right after cutting.

The cache key hashes every image and mask file with the parameters that change the output,
so a rerun with the same inputs only re-hashes the files, and any changed file or parameter
rebuilds the split. Images are decoded in worker processes that send back only their K
patches, and the array is streamed to disk, so memory stays bounded by a few images per
worker whatever the dataset size.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kit.data.caches import adopt_legacy, pick_size
from kit.data.regions import check_select, label_regions, majority_region, region_windows
from kit.data.windows import select_windows, window_scores
from kit.utils import KitError, n_workers

log = logging.getLogger(__name__)

# Bump when the way patches are cut changes, so that old caches are rebuilt.
CODE_VERSION = "patches-2"
SPLITS = ("train", "test")
FILES = ("patches.npy", "samples.csv", "index.csv", "config.yaml", "meta.json")
INDEX_COLUMNS = ("sample_index", "patch", "x", "y", "coverage", "region")


# --------------------------------------------------------------------------- windows
def tissue_mask(image: np.ndarray, threshold: int) -> np.ndarray:
    """Non-background pixels: channel minimum below ``threshold`` (the background is light grey)."""
    # two elementwise minimums: image.min(axis=2) over the length-3 axis is ~25x slower
    return np.minimum(np.minimum(image[..., 0], image[..., 1]), image[..., 2]) < threshold


# --------------------------------------------------------------------------- cutting
def _crop(image, x: int, y: int, size: int, pad_value: int) -> np.ndarray:
    """``size x size x 3`` uint8 crop at (x, y) of an RGB array or a loaded PIL image.

    The part outside the image (only for images smaller than ``size``) is ``pad_value``.
    """
    if isinstance(image, np.ndarray):
        region = image[y:y + size, x:x + size]
    else:
        from kit.data.dataset import to_rgb_array

        w, h = image.size  # cropping the PIL image converts only the crop, not the whole scan
        region = to_rgb_array(image.crop((x, y, min(x + size, w), min(y + size, h))))
    if region.shape[:2] == (size, size):
        return region
    out = np.full((size, size, 3), pad_value, dtype=np.uint8)
    out[: region.shape[0], : region.shape[1]] = region
    return out


def _image_hw(image) -> tuple[int, int]:
    return image.shape[:2] if isinstance(image, np.ndarray) else image.size[::-1]


def _rgb(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    from kit.data.dataset import to_rgb_array

    return to_rgb_array(image)


def rank_windows(mask: np.ndarray, size: int, stride: int, k: int, image=None,
                 tissue_threshold: int = 200):
    """Positions of the ``k`` best windows of one image, best first (``select: top_k``).

    Parameters
    ----------
    mask : bool array H x W
        Region of interest. If it is empty, windows are ranked by tissue coverage of
        ``image`` instead (pixels whose channel minimum is below ``tissue_threshold``).
        If fewer than ``k`` windows touch the mask, windows of equal mask coverage (the
        zeros) are ranked by tissue coverage, so that the last patches show tissue rather
        than background.
    size, stride, k : int
        Window side, step and number of windows kept (see :func:`select_windows`).
    image : uint8 array H x W x 3 or PIL image, optional
        Needed for the tissue ranking; without it ties break by position only.

    Returns
    -------
    xs, ys : int64 arrays of length k
        Top-left corners in image pixels.
    coverage : float64 array of length k
        Share of mask (or, for the fallback, tissue) pixels in each window.
    fallback : bool
        True when the mask was empty and tissue coverage was used.
    """
    return pick_windows(mask, size, stride, k, image, tissue_threshold, regions=False)[:4]


def pick_windows(mask: np.ndarray, size: int, stride: int, k: int, image=None,
                 tissue_threshold: int = 200, select: str = "top_k", min_region_px: int = 1,
                 regions: bool = True):
    """:func:`rank_windows` with a choice of ``select`` and each window's mask region.

    ``select: top_k`` ranks as :func:`rank_windows`; ``per_region`` spreads the windows over
    the mask's connected regions (:func:`kit.data.regions.region_windows`; regions under
    ``min_region_px`` pixels are not sure to get one). Returns ``xs, ys, coverage, fallback,
    region``: ``region`` (int64, length k) is the region a window was chosen for (top_k: the
    one with most pixels in it), 0 for a window without mask pixels; None without ``regions``.
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
    region = None
    if fallback or not (regions or select == "per_region"):
        best = select_windows(coverage, k, then)
        region = np.zeros(k, dtype=np.int64) if regions else None
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


def extract_patches(image, mask: np.ndarray, size: int, stride: int, k: int,
                    tissue_threshold: int = 200, pad_value: int = 255, select: str = "top_k",
                    min_region_px: int = 1):
    """Cut the ``k`` best mask-coverage windows of one image at native resolution.

    Parameters
    ----------
    image : uint8 array H x W x 3, or a PIL image
        The scan; a PIL image is cropped directly, which avoids converting the whole scan.
    mask : bool array H x W
        Region of interest; empty -> tissue coverage (see :func:`rank_windows`).
    size, stride, k : int
        Window side, step and number of windows kept (see :func:`select_windows`).
    tissue_threshold : int
        Channel-minimum threshold of the tissue fallback.
    pad_value : int
        Fill for the part of a window outside an image smaller than ``size`` (255: white,
        lighter than the scans' grey background and never counted as tissue). The image sits
        at the top-left, so ``x, y`` stay image coordinates.
    select, min_region_px : str, int
        ``top_k`` or ``per_region`` (see :func:`pick_windows`).

    Returns
    -------
    patches : uint8 array, k x size x size x 3
    rows : list of dict
        One per patch: ``patch`` (rank), ``x``, ``y`` (top-left in image pixels),
        ``coverage`` (share of mask, or tissue, pixels), ``fallback`` (bool, same for all)
        and ``region`` (the window's mask region, 0 for none).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != tuple(_image_hw(image)):
        raise ValueError(f"mask shape {mask.shape} differs from image shape {_image_hw(image)}")
    xs, ys, cov, fallback, region = pick_windows(mask, size, stride, k, image, tissue_threshold,
                                                 select, min_region_px)
    return cut_windows(image, xs, ys, size, pad_value), _rows(xs, ys, cov, fallback, region)


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

    ``task`` is ``(image_path, mask_path, cfg)``; ``cfg["_stain"]``, when present, is a
    :func:`kit.data.stain.stain_payload` to normalise the patches with. Returns ``(patches, rows,
    seconds)`` with ``seconds`` = ``{"decode", "score", "crop", "stain"}`` (for the
    benchmark) and each row's ``stain_normalised`` (None when off, False when the image had
    too little tissue to estimate its stains and was left as it is). Only the small patch
    array crosses the process boundary, never the decoded scan.
    """
    from PIL import Image

    image_path, mask_path, cfg = task
    size = cfg["size"]
    im = None
    try:
        t0 = time.perf_counter()
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
            cfg.get("select", "top_k"), int(cfg.get("min_region_px", 1)))
        t2 = time.perf_counter()
        patches = cut_windows(im, xs, ys, size, cfg["pad_value"])
        t3 = time.perf_counter()
        normalised = None  # stain normalisation off
        if cfg.get("_stain") is not None:
            from kit.data.stain import apply_payload

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


def decode_file(task):
    """Benchmark floor: decode one image/mask pair and nothing else; returns seconds."""
    from PIL import Image

    image_path, mask_path = task[:2]
    t0 = time.perf_counter()
    with Image.open(mask_path) as mk, Image.open(image_path) as im:
        mk.load()
        im.load()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- cache
@dataclass
class PatchSet:
    """The cached patches of one split.

    ``array`` is memory-mapped (``N x K x P x P x 3`` uint8); row ``i`` of ``samples``
    (``sample_index,label,fallback``) is ``array[i]``; ``index`` has one row per patch
    (``sample_index,patch,x,y,coverage,region``; ``region`` -1 in caches written before it
    was recorded). ``folder`` is where the cache lives.
    """

    array: np.ndarray
    samples: "object"  # pandas DataFrame
    index: "object"  # pandas DataFrame
    key: str
    meta: dict = field(default_factory=dict)
    folder: Path | None = None


def hash_files(files, workers: int = 2) -> list[str]:
    """sha256 of each file, in order; threads overlap the reads (hashlib releases the GIL)."""
    from kit.utils import sha256_file

    files = list(files)
    if len(files) < 8 or workers <= 1:
        return [sha256_file(p, chunk=1 << 22) for p in files]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: sha256_file(p, chunk=1 << 22), files, chunksize=16))


def _key_cfg(cfg: dict) -> dict:
    from kit.data.stain import stain_key

    out = {k: cfg[k] for k in ("size", "stride", "top_k", "tissue_threshold", "pad_value")}
    if cfg.get("select", "top_k") != "top_k":
        # Only then: top_k caches keep their keys (and the feature caches keyed on them).
        out["select"] = cfg["select"]
        out["min_region_px"] = int(cfg["min_region_px"])
    stain = stain_key(cfg.get("stain_norm"))
    if stain is not None:
        # Only when on: the keys of caches built without stain normalisation stay valid.
        out["stain_norm"] = stain
    return out


def cache_key(samples, cfg: dict, split: str, workers: int = 2) -> str:
    """sha256 over the sorted samples (name, label, image and mask file hashes), the
    parameters that change the patches, and :data:`CODE_VERSION`."""
    from kit.utils import sha256_text

    samples = sorted(samples, key=lambda s: s.sample_index)
    hashes = hash_files([p for s in samples for p in (s.image, s.mask)], workers)
    items = [[s.sample_index, s.label or "", hashes[2 * i], hashes[2 * i + 1]]
             for i, s in enumerate(samples)]
    payload = {"version": CODE_VERSION, "split": split, "cfg": _key_cfg(cfg), "samples": items}
    return sha256_text(json.dumps(payload, sort_keys=True))


def _cache_valid(out: Path, key: str, shape: tuple) -> bool:
    if not all((out / name).exists() for name in FILES):
        return False
    try:
        meta = json.loads((out / "meta.json").read_text())
        arr = np.load(out / "patches.npy", mmap_mode="r")
    except (OSError, ValueError):
        return False
    return meta.get("key") == key and arr.shape == shape and arr.dtype == np.uint8


def _npy_writer(f, shape: tuple) -> None:
    """Write an .npy header for a uint8 C-order array of ``shape``; the data follows."""
    np.lib.format.write_array_header_2_0(
        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
            "fortran_order": False, "shape": tuple(int(n) for n in shape)})


def imap_ordered(func, tasks, workers: int):
    """``func(task)`` for each task, in task order, from ``workers`` processes."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(func, tasks)
        return
    import multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() else None  # fork: no re-imports
    with mp.get_context(method).Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap(func, tasks, chunksize=1)


def build_split(samples, out: Path, cfg: dict, workers: int, desc: str = "patches",
                stats: dict | None = None, stain_skipped: list | None = None):
    """Cut the patches of ``samples`` and write ``patches.npy``, ``samples.csv`` and
    ``index.csv`` under ``out`` (each atomically). Returns the per-sample fallback flags.

    ``stats``, when given, receives the summed worker seconds per phase (``decode``,
    ``score``, ``crop``, ``stain``) and the main process's ``write`` seconds.
    ``stain_skipped``, when given, receives the sample indices that stain normalisation left
    as they were (too little tissue).
    """
    import pandas as pd

    from kit.data.stain import stain_payload
    from kit.utils import atomic_path, atomic_write_csv, progress

    size, k = cfg["size"], cfg["top_k"]
    shape = (len(samples), k, size, size, 3)
    payload = stain_payload(cfg.get("stain_norm"))  # the reference is fitted once, here
    task_cfg = cfg if payload is None else {**cfg, "_stain": payload}
    tasks = [(s.image, s.mask, task_cfg) for s in samples]
    index_rows, fallback = [], []
    totals = {"decode": 0.0, "score": 0.0, "crop": 0.0, "stain": 0.0, "write": 0.0}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "patches.npy") as tmp, open(tmp, "wb") as f:
        # Streamed writes, not a memmap: pages written through a mapping count as resident
        # memory of this process, so a large split would grow the peak RSS to its full size.
        _npy_writer(f, shape)
        results = imap_ordered(extract_file, tasks, workers)
        for s, (patches, rows, secs) in progress(zip(samples, results), total=len(samples),
                                                 desc=desc, unit="img"):
            t = time.perf_counter()
            f.write(np.ascontiguousarray(patches, dtype=np.uint8).data)
            totals["write"] += time.perf_counter() - t
            for phase in ("decode", "score", "crop", "stain"):
                totals[phase] += secs[phase]
            fallback.append(bool(rows[0]["fallback"]))
            if rows[0]["stain_normalised"] is False and stain_skipped is not None:
                stain_skipped.append(s.sample_index)
            index_rows += [{"sample_index": s.sample_index, "patch": r["patch"], "x": r["x"],
                            "y": r["y"], "coverage": r["coverage"], "region": r["region"]}
                           for r in rows]
    samples_df = pd.DataFrame({"sample_index": [s.sample_index for s in samples],
                               "label": [s.label or "" for s in samples],
                               "fallback": fallback})
    index_df = pd.DataFrame(index_rows, columns=list(INDEX_COLUMNS))
    atomic_write_csv(out / "samples.csv", samples_df)
    atomic_write_csv(out / "index.csv", index_df)
    if stats is not None:
        stats.update(totals)
    return fallback


def _split_samples(dataset, paths, split: str):
    if split == "train":
        from kit.data.clean import clean_train_samples

        return list(clean_train_samples(dataset, paths))
    if split == "test":
        return list(dataset.test)
    raise KitError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")


def check_patches_config(cfg: dict) -> None:
    """KitError unless a resolved patches.yaml is one ``run_patches`` can build."""
    from kit.data.stain import check_stain_config

    if str(cfg["size"]).strip().lower() == "auto":
        raise KitError("patches: size auto needs a backbone: ./run.sh patches --backbone NAME "
                       "(its native size), or give --size")
    for name in ("size", "stride", "top_k"):
        try:
            value = int(cfg[name])
        except (TypeError, ValueError):
            value = 0
        if value < 1 or str(value) != str(cfg[name]).strip():
            raise KitError(f"patches: {name} must be a whole number >= 1 (got {cfg[name]!r})")
    check_select(cfg)
    check_stain_config(cfg["stain_norm"])


def run_patches(data, paths, cfg: dict, splits=SPLITS, skip_bad: bool = False,
                ) -> dict[str, PatchSet]:
    """Build (or reuse) the patch cache of each split.

    Parameters
    ----------
    data : path or kit.data.dataset.Dataset
        Dataset root, or an already loaded dataset.
    paths : kit.paths.Paths
        Work directory; writes ``paths.patches_dir(split, size)``.
    cfg : dict
        The resolved ``kit/conf/patches.yaml`` (``load_config("patches", overrides)``), with
        a numeric ``size`` (the command resolves ``auto`` from a backbone).
    splits : tuple of str
        ``train`` holds the clean training images only (``kit.data.clean.clean_train_samples``:
        needs ``./run.sh clean`` first); ``test`` every test image.

    Returns
    -------
    dict split -> PatchSet
    """
    from kit.data.dataset import Dataset, load_dataset
    from kit.utils import atomic_write_json, write_config

    check_patches_config(cfg)
    cfg = {**cfg, "size": int(cfg["size"])}
    dataset = data if isinstance(data, Dataset) else load_dataset(data, skip_bad=skip_bad)
    workers = n_workers(cfg.get("workers"))
    out_sets = {}
    for split in splits:
        samples = _split_samples(dataset, paths, split)
        out = paths.patches_dir(split, cfg["size"])
        if adopt_legacy(paths, split, cfg["size"]):
            log.info(f"patches {split}: moved the cache of the old layout to {out}")
        t0 = time.perf_counter()
        key = cache_key(samples, cfg, split, workers)
        shape = (len(samples), cfg["top_k"], cfg["size"], cfg["size"], 3)
        if _cache_valid(out, key, shape):
            log.info(f"patches {split}: cache hit ({out}, {len(samples)} images, "
                     f"{time.perf_counter() - t0:.1f} s)")
            out_sets[split] = load_patches(paths, split, cfg["size"])
            continue
        (out / "meta.json").unlink(missing_ok=True)  # meta.json is written last: the commit mark
        skipped: list = []
        fallback = build_split(samples, out, cfg, workers, desc=f"patches {split}",
                               stain_skipped=skipped)
        write_config(out / "config.yaml", cfg)
        flagged = [s.sample_index for s, fb in zip(samples, fallback) if fb]
        meta = {"key": key, "version": CODE_VERSION, "split": split, "config": cfg,
                "dataset": str(dataset.root), "n_samples": len(samples), "shape": list(shape),
                "n_fallback": len(flagged), "fallback": flagged}
        if cfg["stain_norm"]["method"] != "none":
            meta["stain_norm"] = {"method": cfg["stain_norm"]["method"],
                                  "n_skipped": len(skipped), "skipped": skipped}
        atomic_write_json(out / "meta.json", meta)
        if flagged:
            print(f"warning: patches {split}: {len(flagged)} image(s) with an empty mask, "
                  f"ranked by tissue coverage instead: {', '.join(flagged)}", file=sys.stderr)
        if skipped:
            print(f"warning: patches {split}: {len(skipped)} image(s) with too little tissue "
                  f"for stain normalisation, left as they are: {', '.join(skipped)}",
                  file=sys.stderr)
        log.info(f"patches {split}: built {len(samples)} x {cfg['top_k']} patches of "
                 f"{cfg['size']} px ({cfg['select']}) -> {out} ({time.perf_counter() - t0:.1f} s)")
        out_sets[split] = load_patches(paths, split, cfg["size"])
    return out_sets


def load_patches(paths, split: str, size: int | None = None) -> PatchSet:
    """The cached patches of ``split`` cut with ``size`` px windows (array memory-mapped
    read-only); ``size`` None: the only size cached (:func:`kit.data.caches.pick_size`)."""
    import pandas as pd

    out = paths.patches_dir(split, pick_size(paths) if size is None else size)
    missing = [name for name in FILES if not (out / name).exists()]
    if missing:
        raise KitError(f"no patch cache at {out} (missing {', '.join(missing)}); "
                       "run ./run.sh patches first")
    meta = json.loads((out / "meta.json").read_text())
    array = np.load(out / "patches.npy", mmap_mode="r")
    samples = pd.read_csv(out / "samples.csv", dtype={"sample_index": str, "label": str},
                          keep_default_na=False)
    samples["fallback"] = samples["fallback"].astype(str).str.lower() == "true"
    index = pd.read_csv(out / "index.csv", dtype={"sample_index": str})
    if "region" not in index.columns:  # written before regions were recorded
        index["region"] = -1
    if array.shape[0] != len(samples) or len(index) != array.shape[0] * array.shape[1]:
        raise KitError(f"{out}: patches.npy ({array.shape[0]} images) does not match "
                       f"samples.csv ({len(samples)} rows) / index.csv; rerun ./run.sh patches")
    return PatchSet(array=array, samples=samples, index=index, key=meta.get("key", ""), meta=meta,
                    folder=out)


def find_patches(paths, split: str, key: str) -> PatchSet | None:
    """The cache of ``split`` whose key is ``key`` (a run's ``patch_keys``), whatever its size;
    None when no cached size has it."""
    from kit.data.caches import cached_sizes

    for size in cached_sizes(paths):
        try:
            meta = json.loads((paths.patches_dir(split, size) / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if meta.get("key") == key:
            return load_patches(paths, split, size)
    return None


def patches_for(paths, native: int | None = None, size="auto", splits=SPLITS,
                backbone: str | None = None) -> list[PatchSet]:
    """The caches a backbone trains on, one per split: the only size cached, else its
    ``native`` size, or ``size`` when a number (train.yaml ``patches_size``); else a KitError
    naming the ``./run.sh patches`` command to run (:func:`kit.data.caches.pick_size`)."""
    chosen = pick_size(paths, native, size, backbone)
    if native is not None and chosen != int(native) and backbone:
        log.info(f"{backbone}: training on the {chosen} px patch cache ({backbone}'s native size "
                 f"is {int(native)} px: ./run.sh patches --backbone {backbone} builds that one)")
    return [load_patches(paths, split, chosen) for split in splits]
