"""Mask-guided patches: K mask-coverage windows of every image, cached per split and size.

A task without masks (``masks: null``) gets the windows with the most tissue instead (the
empty-mask fallback below, ``tissue_threshold``), so every later stage reads the same cache.

A ``size x size`` window slides with ``stride`` over each image; its score is the share of
mask pixels inside it, computed from a summed-area table sampled at the window edges (no
per-window Python loop). ``select: top_k`` keeps the ``top_k`` best windows; ties go to the
window with more tissue when fewer than ``top_k`` windows touch the mask, then to the
top-left one. ``select: per_region`` spreads them over the mask's connected regions
(:mod:`kit.data.regions`). The windows are cut at native resolution and stored in one uint8
array per split, ``runs/patches/<size>px/<split>/patches.npy`` (``N x K x P x P x 3``), beside
``samples.csv``, ``index.csv`` (with each window's mask ``region``), ``meta.json`` and
``config.yaml``; caches of several sizes coexist (:mod:`kit.data.caches` picks one). One
image's windows are picked and cut by :mod:`kit.data.cutting`.

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
import multiprocessing as mp
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kit.data.caches import adopt_legacy, cached_sizes, pick_size
from kit.data.clean import clean_train_samples
from kit.data.cutting import extract_file
from kit.data.dataset import Dataset, load_dataset
from kit.data.stain import check_stain_config, stain_key, stain_payload
from kit.task import as_data
from kit.utils import (
    KitError,
    atomic_path,
    atomic_write_csv,
    atomic_write_json,
    n_workers,
    progress,
    sha256_file,
    sha256_text,
    write_config,
)

log = logging.getLogger(__name__)

# Bump when the way patches are cut changes, so that old caches are rebuilt.
CODE_VERSION = "patches-2"
SPLITS = ("train", "test")
FILES = ("patches.npy", "samples.csv", "index.csv", "config.yaml", "meta.json")
INDEX_COLUMNS = ("sample_index", "patch", "x", "y", "coverage", "region")


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
    files = list(files)
    if len(files) < 8 or workers <= 1:
        return [sha256_file(p, chunk=1 << 22) for p in files]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: sha256_file(p, chunk=1 << 22), files, chunksize=16))


def _key_cfg(cfg: dict) -> dict:
    out = {k: cfg[k] for k in ("size", "stride", "top_k", "tissue_threshold", "pad_value")}
    if cfg["select"] != "top_k":
        # Only then: top_k caches keep their keys (and the feature caches keyed on them).
        out["select"] = cfg["select"]
        out["min_region_px"] = int(cfg["min_region_px"])
    stain = stain_key(cfg["stain_norm"])
    if stain is not None:
        # Only when on: the keys of caches built without stain normalisation stay valid.
        out["stain_norm"] = stain
    return out


def cache_key(samples, cfg: dict, split: str, workers: int = 2) -> str:
    """sha256 over the sorted samples (name, label, image and mask file hashes; a sample
    without a mask has no mask hash), the parameters that change the patches, and
    :data:`CODE_VERSION`."""
    samples = sorted(samples, key=lambda s: s.sample_index)
    files = [[s.image] + ([] if s.mask is None else [s.mask]) for s in samples]
    hashes = iter(hash_files([p for pair in files for p in pair], workers))
    items = [[s.sample_index, s.label or "", *(next(hashes) for _ in pair)]
             for s, pair in zip(samples, files)]
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
    size, k = cfg["size"], cfg["top_k"]
    shape = (len(samples), k, size, size, 3)
    payload = stain_payload(cfg["stain_norm"])  # the reference is fitted once, here
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
        return list(clean_train_samples(dataset, paths))
    if split == "test":
        return list(dataset.test)
    raise KitError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")


def check_patches_config(cfg: dict) -> None:
    """KitError unless a resolved patches.yaml (its values checked by kit.schema) is one
    ``run_patches`` can build: a size, and a stain reference that exists."""
    if str(cfg["size"]).strip().lower() == "auto":
        raise KitError("patches: size auto needs a backbone: ./run.sh patches --backbone NAME "
                       "(its native size), or give --size")
    check_stain_config(cfg["stain_norm"])


def run_patches(paths, data, cfg: dict, *, splits=SPLITS, skip_bad: bool = False,
                ) -> dict[str, PatchSet]:
    """Build (or reuse) the patch cache of each split.

    Parameters
    ----------
    paths : kit.paths.Paths
        Work directory; writes ``paths.patches_dir(split, size)``.
    data : kit.task.Data, path or kit.data.dataset.Dataset
        Dataset root with its task (:func:`kit.task.as_data`), or an already loaded dataset.
        Without masks (``task.masks`` null) every image's windows are its most tissued ones.
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
    check_patches_config(cfg)
    cfg = {**cfg, "size": int(cfg["size"])}
    dataset = data if isinstance(data, Dataset) else load_dataset(as_data(data),
                                                                  skip_bad=skip_bad)
    workers = n_workers(cfg["workers"])
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
        if flagged and not dataset.task.has_masks:
            log.info(f"patches {split}: no masks in task {dataset.task.name}: windows ranked "
                     "by tissue coverage")
        elif flagged:
            log.warning(f"warning: patches {split}: {len(flagged)} image(s) with an empty "
                        f"mask, ranked by tissue coverage instead: {', '.join(flagged)}")
        if skipped:
            log.warning(f"warning: patches {split}: {len(skipped)} image(s) with too little "
                        f"tissue for stain normalisation, left as they are: {', '.join(skipped)}")
        log.info(f"patches {split}: built {len(samples)} x {cfg['top_k']} patches of "
                 f"{cfg['size']} px ({cfg['select']}) -> {out} ({time.perf_counter() - t0:.1f} s)")
        out_sets[split] = load_patches(paths, split, cfg["size"])
    return out_sets


def load_patches(paths, split: str, size: int | None = None) -> PatchSet:
    """The cached patches of ``split`` cut with ``size`` px windows (array memory-mapped
    read-only); ``size`` None: the only size cached (:func:`kit.data.caches.pick_size`)."""
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
