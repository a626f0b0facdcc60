"""The kit's one synthetic-data generator: datasets in the challenge layout, patch caches,
embeddings.

Used by ``./run.sh demo``, every ``./run.sh bench`` and the tests, so that class counts, junk and
class signal are defined once.

**Datasets** (:func:`generate`): each image is a low-magnification "scan": a light-grey
background with one to three curved H&E tissue strips (pink stroma, purple nuclei), and a
single-channel 0/255 mask with one to four regions inside the tissue. The class lives only
inside the mask: tumour nuclei there have a class-specific size, density and darkness (scaled
by ``signal``), while the tissue outside the mask (sparse spindle-shaped nuclei) is drawn the
same way for every class. Nuclei and strip widths are in pixels, as on the real 1024 px scans,
so 128 px top-mask-coverage patches see the signal while a whole-image resize or random
windows mostly see background and normal tissue (at small short sides the strips are
therefore relatively wider than on the real scans).

Planted junk, as in the real v2 training set: "cartoon" images (a yellow-green ogre face cut
into tissue-strip silhouettes) that reuse another training image's mask file byte for byte,
and real scans with one saturated green star-shaped splat. ``junk_truth.csv`` beside the
layout lists them. ``label_noise`` flips written labels (both splits, as annotation errors),
and ``test_labels=True`` writes the test labels to ``test_labels_heldout.csv`` at the root:
a file no stage of the kit reads, so that a benchmark can score test predictions.

**Presets** (:func:`preset`): ``demo`` (120/40 images, short side 256) and ``v2`` (the real
v2 counts: 691 training images with exactly its label counts, 60 cartoons, 50 green, 477
test images; 1024 x at most 1433 px).

**In memory** (tests and benches that skip the data stages): :func:`tinted_patches`
(patch arrays whose class is a colour tint), :func:`write_patch_workdir` (a work directory
with both patch caches and a folds file, in the formats of ``docs/DESIGN.md``) and
:func:`embeddings` (patch embeddings with a class signal).

This module writes the datasets; the plan (:mod:`kit.data.synth_plan`), the drawing
(:mod:`kit.data.synth_draw`) and the in-memory fixtures (:mod:`kit.data.synth_fixtures`) live
beside it, and their public names are importable from here.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from kit import CLASSES
from kit.data import synth_draw, synth_plan
from kit.data.synth_draw import NORMAL, STRIP_HALF_PX, TUMOUR, Nuclei, draw, phenotypes
from kit.data.synth_fixtures import (
    TINTS,
    embeddings,
    stratified_folds,
    tinted_patches,
    write_folds,
    write_patch_cache,
    write_patch_workdir,
)
from kit.data.synth_plan import (
    CARTOON_LABELS,
    CARTOON_RATE,
    CLEAN_COUNTS,
    GREEN_RATE,
    V2_NONCARTOON_COUNTS,
    Item,
    make_plan,
)
from kit.utils import KitError, n_workers, progress

__all__ = [
    "CARTOON_LABELS", "CARTOON_RATE", "CLASSES", "CLEAN_COUNTS", "GREEN_RATE", "JUNK_CSV",
    "META_JSON", "NORMAL", "PRESETS", "STRIP_HALF_PX", "STYLES", "TEST_LABELS_CSV", "TINTS",
    "TUMOUR", "V2_NONCARTOON_COUNTS", "Item", "Nuclei", "draw", "embeddings", "generate",
    "make_plan", "phenotypes", "png_bytes", "preset", "read_test_labels", "reusable",
    "stratified_folds", "swap_in", "tinted_patches", "write_folds", "write_patch_cache",
    "write_patch_workdir",
]

JUNK_CSV = "junk_truth.csv"
META_JSON = "demo.json"
TEST_LABELS_CSV = "test_labels_heldout.csv"
STYLES = ("scan", "plain")

PRESETS = {
    "demo": dict(n_train=120, n_test=40, short_side=256),
    # The real data's long side reaches 4200 px (train); 1433 keeps a full-scale set practical.
    "v2": dict(n_train=691, n_test=477, short_side=1024, long_side_max=1433, n_cartoon=60,
               n_green=50, class_counts=V2_NONCARTOON_COUNTS),
}
_PNG = {"format": "PNG", "compress_level": 1, "optimize": False}  # fixed: byte-identical reruns


def preset(name: str, **overrides) -> dict:
    """The :func:`generate` arguments of preset ``name`` (``demo`` or ``v2``), with overrides."""
    if name not in PRESETS:
        raise KitError(f"unknown synthetic-data preset {name!r}; known: {', '.join(PRESETS)}")
    return {**PRESETS[name], **overrides}


def generate(out_dir, n_train: int = 120, n_test: int = 40, short_side: int = 256, seed: int = 0,
             n_cartoon: int | None = None, n_green: int | None = None,
             long_side_max: int | None = None, n_test_green: int = 1, *,
             class_counts: dict | None = None, signal: float = 1.0, label_noise: float = 0.0,
             test_labels: bool = False, style: str = "scan", workers: int = 0) -> Path:
    """Write a generated dataset in the challenge layout under ``out_dir`` and return ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Dataset root to create (``train_data/``, ``test_data/``, ``train_labels.csv``, plus
        ``junk_truth.csv`` and ``demo.json``). A rerun with the same arguments reuses the
        folder; an existing generated folder is replaced; any other folder is refused.
    n_train, n_test : int
        Number of training and test image/mask pairs.
    short_side : int
        Short image side in pixels; the long side is 1.5-4x that.
    seed : int
        Same seed and arguments give byte-identical files.
    n_cartoon, n_green : int, optional
        Planted junk in the training set (default: the v2 rates, 60 and 50 per 691, at least
        2 each when there are 12 or more training images).
    long_side_max : int, optional
        Cap on the long side.
    n_test_green : int
        Test images with a green splat (reported by the clean stage, never dropped).
    class_counts : dict, optional
        Class -> count whose shares the non-cartoon training images and the test images
        follow (default :data:`CLEAN_COUNTS`; the ``v2`` preset: exact v2 label counts).
    signal : float
        Strength of the class signal inside the masks: 1 as drawn by default, 0 none (every
        class the same tumour), in between or above scales the phenotypes' differences.
    label_noise : float
        Share of written labels (training and held-back test, not cartoons) replaced by
        another class at random; the pixels keep their drawn class.
    test_labels : bool
        Also write the test labels to ``test_labels_heldout.csv`` (never read by the kit).
    style : {"scan", "plain"}
        ``plain``: flat background and noisy flat-colour strips (no nuclei, no class signal,
        cheaper to decode than the real scans); for timing benchmarks.
    workers : int
        Drawing threads; 0 = one per available core.
    """
    out_dir = Path(out_dir)
    params = dict(n_train=n_train, n_test=n_test, short_side=short_side, seed=seed,
                  n_cartoon=n_cartoon, n_green=n_green, long_side_max=long_side_max,
                  n_test_green=n_test_green, version=_code_version())
    extra = dict(class_counts=class_counts, signal=signal, label_noise=label_noise,
                 test_labels=test_labels, style=style)
    # Recorded only when set, so a default dataset's demo.json keeps its fields.
    params.update({k: v for k, v in extra.items()
                   if v != {"signal": 1.0, "label_noise": 0.0, "test_labels": False,
                            "style": "scan"}.get(k)})
    if style not in STYLES:
        raise KitError(f"synthetic data: style must be one of {', '.join(STYLES)} (got {style!r})")
    if not (np.isfinite(signal) and signal >= 0):
        raise KitError(f"synthetic data: signal must be a number >= 0 (got {signal!r})")
    if reusable(out_dir, params, META_JSON):
        return out_dir
    plan = make_plan(n_train, n_test, short_side, seed, n_cartoon, n_green, long_side_max,
                     n_test_green, class_counts=class_counts, label_noise=label_noise)
    return swap_in(out_dir, params, META_JSON,
                   lambda tmp: _write_all(tmp, plan, seed, workers, signal=signal, style=style,
                                          test_labels=test_labels))


def reusable(out_dir: Path, params: dict, meta: str) -> bool:
    """Whether ``out_dir`` already holds the generated dataset of ``params`` (its record
    ``meta`` says so); KitError when it is a non-empty folder no generator wrote."""
    if _up_to_date(out_dir, params, meta):
        return True
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / meta).exists():
        raise KitError(f"{out_dir}: exists and is not a generated dataset (no {meta}); "
                       "choose another folder or delete it")
    return False


def swap_in(out_dir: Path, params: dict, meta: str, write) -> Path:
    """``write(folder)`` into a temporary folder beside ``out_dir``, ``params`` recorded as
    ``meta`` there, then swapped in for ``out_dir``: a crash never leaves half a dataset."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is not
    try:
        write(tmp)
        (tmp / meta).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def read_test_labels(root) -> pd.DataFrame:
    """The held-back test labels of a dataset generated with ``test_labels=True``."""
    path = Path(root) / TEST_LABELS_CSV
    if not path.is_file():
        raise KitError(f"{path}: not found; generate the data with test_labels=True")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


# ---------------------------------------------------------------------------------------------
# Writing


def _write_all(root: Path, plan: list[Item], seed: int, workers: int = 0, signal: float = 1.0,
               style: str = "scan", test_labels: bool = False) -> None:
    for split in ("train", "test"):
        (root / f"{split}_data").mkdir(parents=True)
    work = partial(_write_one, root=root, seed=seed, signal=signal, style=style)
    workers = n_workers(workers)
    bar = dict(total=len(plan), desc="synthetic data", unit="img")
    if workers <= 1 or len(plan) < 32:
        for item in progress(plan, **bar):
            work(item)
    else:
        # threads: numpy, scipy and zlib release the GIL for the heavy parts
        with ThreadPoolExecutor(workers) as pool:
            for _ in progress(pool.map(work, plan), **bar):
                pass
    for item in plan:  # cartoons copy their host's mask file byte for byte
        if item.kind == "cartoon":
            folder = root / "train_data"
            shutil.copyfile(folder / f"mask_{item.host:04d}.png",
                            folder / item.name.replace("img_", "mask_"))
    for split, name in (("train", "train_labels.csv"), ("test", TEST_LABELS_CSV)):
        if split == "test" and not test_labels:
            continue
        rows = [it for it in plan if it.split == split]
        labels = pd.DataFrame({"sample_index": [it.name for it in rows],
                               "label": [it.written for it in rows]})
        labels.to_csv(root / name, index=False, lineterminator="\n")
    junk = pd.DataFrame([{"split": it.split, "sample_index": it.name, "kind": it.kind,
                          "mask_of": f"img_{it.host:04d}.png" if it.host is not None else ""}
                         for it in plan if it.kind != "real"],
                        columns=["split", "sample_index", "kind", "mask_of"])
    junk.to_csv(root / JUNK_CSV, index=False, lineterminator="\n")


def _write_one(item: Item, root: Path, seed: int, signal: float = 1.0,
               style: str = "scan") -> None:
    img, mask = draw(item, seed, signal, style)
    folder = root / f"{item.split}_data"
    (folder / item.name).write_bytes(png_bytes(img))
    if item.kind != "cartoon":  # cartoons get their host's mask file afterwards
        (folder / item.name.replace("img_", "mask_")).write_bytes(png_bytes(mask))


def png_bytes(arr: np.ndarray) -> bytes:
    """``arr`` as PNG bytes, with fixed settings: byte-identical reruns."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, **_PNG)
    return buf.getvalue()


def _code_version() -> str:
    """sha256 prefix of the code that decides the generated bytes: this module, the plan and
    the drawing (a change to any of them regenerates a dataset on its next use)."""
    digest = hashlib.sha256()
    for module in (__file__, synth_plan.__file__, synth_draw.__file__):
        digest.update(Path(module).read_bytes())
    return digest.hexdigest()[:12]


def _up_to_date(out_dir: Path, params: dict, meta: str) -> bool:
    meta = out_dir / meta
    try:
        return json.loads(meta.read_text()) == json.loads(json.dumps(params))
    except (OSError, ValueError):
        return False
