"""The embedding cache: every patch and test-time view embedded once by a frozen backbone,
kept on disk under a key of everything the vectors depend on."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from numpy.lib.format import open_memmap

from kit.config import given
from kit.models.backbones import create_backbone, freeze_backbone
from kit.models.normalize import normalize_batch
from kit.training.build import recalibrate_random
from kit.training.checkpoints import weights_digest
from kit.training.device import amp_dtype, pick_device
from kit.training.tta import apply_view
from kit.utils import (
    KitError,
    atomic_write_json,
    progress,
    seed_everything,
    sha256_text,
    write_config,
)

log = logging.getLogger(__name__)


CODE_VERSION = "features-1"
FILES = ("features.npy", "meta.json")


# --------------------------------------------------------------------------- cache key
def cache_views(views) -> tuple[str, ...]:
    """The views to embed: ``id`` first (early stopping validates on it), then the others."""
    views = tuple(views)
    return ("id",) + tuple(v for v in views if v != "id")


def feature_key(backbone, patch_key: str, views, dtype: str, digest: str | None = None,
                autocast: str | None = None) -> str:
    """Cache key of one split's embeddings (see the module docstring)."""
    payload = {
        "version": CODE_VERSION, "backbone": backbone.name,
        "weights_sha256": digest or weights_digest(backbone),
        "num_features": int(backbone.num_features), "input_size": int(backbone.input_size),
        "mean": list(backbone.mean), "std": list(backbone.std),
        "patch_key": str(patch_key), "views": list(views), "dtype": dtype,
    }
    if autocast:
        payload["autocast"] = autocast
    return sha256_text(json.dumps(payload, sort_keys=True))


# --------------------------------------------------------------------------- embedding
@dataclass
class Features:
    """Cached embeddings of one split: ``array[i, k, v]`` is patch ``k`` of image ``i``
    (row ``i`` of ``samples``) seen through view ``views[v]``."""

    array: np.ndarray  # N x K x V x D, memory-mapped read-only
    samples: pd.DataFrame
    views: tuple[str, ...]
    key: str
    path: Path
    hit: bool
    meta: dict = field(default_factory=dict)


def _valid(folder: Path, key: str) -> bool:
    if not all((folder / f).exists() for f in FILES):
        return False
    try:
        return json.loads((folder / "meta.json").read_text()).get("key") == key
    except ValueError:
        return False


def embed_array(backbone, array, views, out, batch_size: int = 64, device="cpu",
                desc: str = "embed", amp: str = "off") -> None:
    """Fill ``out[i, k, v]`` with the embedding of patch ``k`` of image ``i`` in view ``v``.

    ``array`` is ``N x K x P x P x 3`` uint8 (memmap fine); batches hold ``batch_size``
    patches (whole images), normalised on ``device`` as :func:`kit.training.predict.predict` does.
    ``amp`` (auto|off|bf16|fp16, as in train.yaml) runs the forward pass under autocast; the
    vectors are stored as float32 either way.
    """
    device = torch.device(device)
    dtype = amp_dtype(device, amp)
    backbone.eval().to(device)
    n, k = array.shape[:2]
    per_chunk = max(1, int(batch_size) // k)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        for a in progress(range(0, n, per_chunk), desc=desc, unit="batch"):
            sel = slice(a, min(n, a + per_chunk))
            x = torch.from_numpy(np.array(array[sel])).reshape(-1, *array.shape[2:])
            x = normalize_batch(x.to(device), backbone.mean, backbone.std, backbone.input_size)
            for j, view in enumerate(views):
                f = backbone(apply_view(x, view)).float().cpu().numpy()
                out[sel, :, j] = f.reshape(-1, k, f.shape[-1])


def _settings(cfg: dict, device):
    """The cache settings, the device and the autocast mode that enter the key."""
    cfg = given(cfg, "features")
    dtype = str(cfg["dtype"])  # float16 or float32 (kit.schema)
    if device is None:
        device = pick_device(None if cfg["device"] == "auto" else cfg["device"])
    # auto resolves here (bf16/fp16 on CUDA, off elsewhere), so the key names what ran.
    autocast = {None: None, torch.bfloat16: "bf16", torch.float16: "fp16"}[
        amp_dtype(torch.device(device), cfg["amp"])]
    return cfg, dtype, device, autocast


def cache_key(backbone, patches, views, cfg: dict, device=None,
              digest: str | None = None) -> str:
    """The key :func:`load_or_embed` files ``patches``' embeddings under, without embedding
    anything (a fused run hashes its parts' keys before deciding which folds to train)."""
    _, dtype, _, autocast = _settings(cfg, device)
    return feature_key(backbone, patches.key, cache_views(views), dtype,
                       digest or weights_digest(backbone), autocast)


def load_or_embed(backbone, patches, paths, split: str, views, cfg: dict,
                  device=None, digest: str | None = None) -> Features:
    """The cached embeddings of ``patches`` (a :class:`kit.data.patches.PatchSet`), computed now
    on a miss. Safe with several workers: each embeds into its own temporary folder and the
    first to finish renames it into place; the others drop theirs and read the winner's."""
    cfg, dtype, device, autocast = _settings(cfg, device)
    views = cache_views(views)
    digest = digest or weights_digest(backbone)
    key = feature_key(backbone, patches.key, views, dtype, digest, autocast)
    folder = paths.features_dir / backbone.name / f"{split}-{key[:16]}"
    hit = _valid(folder, key)
    if not hit:
        n, k = patches.array.shape[:2]
        shape = (n, k, len(views), int(backbone.num_features))
        tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            t0 = time.perf_counter()
            # float32 in memory first: float16's range is checked before anything is stored.
            full = np.zeros(shape, np.float32)
            embed_array(backbone, patches.array, views, full, int(cfg["batch_size"]), device,
                        desc=f"embed {backbone.name} {split}", amp=autocast or "off")
            stored, problem = storage_dtype(full, dtype)
            if problem:
                log.info(f"features: {backbone.name} {split}: {problem}; stored as {stored} "
                         "instead of float16")
            out = open_memmap(tmp / "features.npy", mode="w+", dtype=stored, shape=shape)
            out[:] = full
            out.flush()
            del out, full
            meta = {"key": key, "backbone": backbone.name, "weights_sha256": digest,
                    "weights_source": str(backbone.weights_source), "split": split,
                    "patch_key": patches.key, "views": list(views), "shape": list(shape),
                    "dtype": dtype, "stored_dtype": stored, "range_problem": problem,
                    "autocast": autocast,
                    "input_size": int(backbone.input_size),
                    "seconds": round(time.perf_counter() - t0, 2), "version": CODE_VERSION}
            write_config(tmp / "config.yaml", {"features": cfg, "views": list(views)})
            atomic_write_json(tmp / "meta.json", meta)
            _publish(tmp, folder, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info(f"features: embedded {n} x {k} {split} patches x {len(views)} views with "
                 f"{backbone.name} in {meta['seconds']:.1f} s -> {folder}")
    meta = json.loads((folder / "meta.json").read_text())
    array = np.load(folder / "features.npy", mmap_mode="r")
    if array.shape[:2] != patches.array.shape[:2]:
        raise KitError(f"{folder}: cached features do not match the patch cache; delete the "
                       "folder and rerun")
    return Features(array, patches.samples, views, key, folder, hit, meta)


FP16_MAX = 65504.0
FP16_TINY = 6.104e-5  # smallest normal float16; below it precision drains away


def storage_dtype(features: np.ndarray, dtype: str) -> tuple[str, str | None]:
    """The dtype to store ``features`` in: ``dtype``, or float32 when float16 would overflow
    (any value above 65504) or underflow (over 1 % of the non-zero values below 6.1e-5, as
    with a random frozen EfficientNet's ~3e-5 embeddings). Returns ``(dtype, problem)``."""
    if dtype != "float16" or features.size == 0:
        return dtype, None
    mag = np.abs(features)
    top = float(mag.max())
    if not np.isfinite(top) or top > FP16_MAX:
        return "float32", f"values up to {top:.3g} overflow float16 (max {FP16_MAX:g})"
    nonzero = mag[mag > 0]
    tiny = float((nonzero < FP16_TINY).mean()) if nonzero.size else 0.0
    if tiny > 0.01:
        return "float32", (f"{tiny:.0%} of the values are below {FP16_TINY:.2g} and would "
                           "underflow float16 (median magnitude "
                           f"{float(np.median(nonzero)):.2g})")
    return dtype, None


def _publish(tmp: Path, folder: Path, key: str) -> None:
    try:
        os.rename(tmp, folder)
    except OSError:
        if not _valid(folder, key):  # not a finished copy by another worker: replace it
            shutil.rmtree(folder, ignore_errors=True)
            os.rename(tmp, folder)


def frozen_backbone(backbone: str, cfg: dict, weights="auto", seed: int = 42,
                    patch_size: int | None = None):
    """The backbone built as cv builds it (seeded), frozen entirely and in eval mode."""

    seed_everything(seed)
    bb = create_backbone(backbone, weights=weights, patch_size=patch_size,
                         phikon_mode=cfg["phikon_mode"])
    freeze_backbone(bb, train_norm=(), unfreeze_last=0)
    return bb.eval()


def cache_backbone(backbone: str, cfg: dict, train, weights="auto", seed: int = 42,
                   device="cpu"):
    """The backbone whose embeddings a cache holds, built the one way cv, tune and fusion
    share: frozen whole (:func:`frozen_backbone`) at ``train``'s patch size, ``input_size``
    as the config says, and AdaBN for random weights on every training patch (pixels, no
    labels), so that every fold and trial reads one cache."""
    bb = frozen_backbone(backbone, cfg, weights, seed, patch_size=int(train.array.shape[2]))
    if int(cfg["input_size"]) > 0:
        bb.input_size = int(cfg["input_size"])  # as build_model: the embeddings use it too
    recalibrate_random(bb, cfg, train.array, None, device, data_key=train.key)
    return bb
