"""Freezing a backbone (all but its norm layers and last blocks) and re-estimating its
BatchNorm statistics."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kit.models.backbones.base import Backbone
from kit.utils import KitError

NORM_KINDS = {
    # _BatchNorm covers BatchNorm1d/2d/3d and timm's BatchNormAct2d; nn.LayerNorm covers
    # timm's LayerNorm2d; nn.GroupNorm covers timm's GroupNorm/GroupNorm1.
    "batchnorm": nn.modules.batchnorm._BatchNorm,
    "groupnorm": nn.GroupNorm,
    "layernorm": nn.LayerNorm,
}


def _norm_types(train_norm) -> tuple[type, ...]:
    if train_norm is None:
        return ()
    kinds = train_norm.split(",") if isinstance(train_norm, str) else list(train_norm)
    kinds = [str(k).strip().lower() for k in kinds]
    kinds = [k for k in kinds if k and k != "none"]
    unknown = [k for k in kinds if k not in NORM_KINDS]
    if unknown:
        raise KitError(f"train_norm: unknown kind(s) {', '.join(unknown)}; "
                       f"use any of {', '.join(NORM_KINDS)} or none")
    return tuple(NORM_KINDS[k] for k in kinds)


def freeze_backbone(backbone: Backbone, train_norm=("batchnorm", "groupnorm", "layernorm"),
                    unfreeze_last: int = 0) -> int:
    """Freeze ``backbone`` except its normalisation layers and its last ``unfreeze_last`` blocks.

    Parameters
    ----------
    train_norm : sequence of {"batchnorm", "groupnorm", "layernorm"} or comma-separated str
        Kinds of normalisation layers that stay trainable (empty or "none": none).
    unfreeze_last : int
        Number of blocks (``backbone.blocks()``, from the end) left fully trainable.

    Returns
    -------
    int
        Number of trainable parameters of the backbone.
    """
    norms = _norm_types(train_norm)
    blocks = backbone.blocks()
    if not isinstance(unfreeze_last, int) or isinstance(unfreeze_last, bool) \
            or not 0 <= unfreeze_last <= len(blocks):
        raise KitError(f"unfreeze_last must be an integer in 0..{len(blocks)} for "
                       f"{getattr(backbone, 'name', 'this backbone')} (got {unfreeze_last!r})")
    backbone.requires_grad_(False)
    for module in backbone.modules():
        if norms and isinstance(module, norms):
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
    for block in blocks[len(blocks) - unfreeze_last:]:
        block.requires_grad_(True)
    return count_trainable(backbone)


def count_trainable(module: nn.Module) -> int:
    """Number of parameters with ``requires_grad``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- AdaBN
def recalibrate_batchnorm(backbone: Backbone, array, rows=None, batch_size: int = 64,
                          device="cpu", max_batches: int | None = None) -> int:
    """Re-estimate the BatchNorm statistics of a frozen backbone on the data (AdaBN).

    A randomly initialised network in eval mode normalises with running statistics of
    0 / 1 that have nothing to do with its activations: a random ``efficientnet_b0`` then
    gives embeddings of magnitude ~1e-5, which a head cannot learn from (and float16
    cannot store). Resetting the statistics and averaging them over real patches gives
    activations of order 1 (Li et al., 2016, "Revisiting batch normalization for practical
    domain adaptation"). Only the running mean/variance buffers change, never a weight.

    Parameters
    ----------
    backbone : Backbone
        Moved to ``device``; left there, in eval mode.
    array : uint8 array ``N x K x P x P x 3``
        Patches (a memmap is fine), normalised like :func:`kit.training.predict.predict` does
        (:func:`kit.training.augment.normalize_batch` with the backbone's mean, std and input size).
    rows : int array, optional
        Images to use (default: all), e.g. the fold's training rows.
    batch_size : int
        Patches per forward pass. Statistics are a cumulative average over batches
        (``momentum=None``); batches are of (nearly) equal size so every patch counts alike.
    max_batches : int, optional
        Use at most ``max_batches * batch_size`` patches, spread evenly over the images.

    Returns
    -------
    int
        Number of patches used (0 when the backbone has no BatchNorm layer: nothing to do).
        Deterministic: the same inputs give the same statistics.
    """
    from kit.models.normalize import normalize_batch

    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    backbone.eval()
    if not bns:
        return 0
    shape = getattr(array, "shape", ())
    if len(shape) != 5 or shape[-1] != 3 or np.dtype(array.dtype) != np.uint8:
        raise KitError(f"recalibrate_batchnorm: patches must be a uint8 N x K x P x P x 3 array "
                       f"(got shape {tuple(shape)}, dtype {getattr(array, 'dtype', None)})")
    for key, value in (("batch_size", batch_size), ("max_batches", max_batches)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise KitError(f"recalibrate_batchnorm: {key} must be an integer >= 1 "
                           f"(got {value!r})")
    rows = np.arange(shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    k = int(shape[1])
    n = len(rows) * k
    if n == 0:
        raise KitError("recalibrate_batchnorm: no patches to estimate statistics from")
    limit = n if max_batches is None else min(n, max_batches * batch_size)
    # Evenly spaced patch numbers: every image contributes, and the choice is fixed.
    flat = np.arange(n) if limit == n else np.unique(np.linspace(0, n - 1, limit).round()
                                                     .astype(np.int64))
    # array_split: equal sizes up to one, so no batch of 1 (which BatchNorm refuses on 1x1 maps)
    # and the cumulative average weighs every patch (almost) equally.
    batches = np.array_split(flat, -(-len(flat) // batch_size))
    device = torch.device(device)
    backbone.to(device)
    saved = [(m, m.momentum) for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over all batches
            m.train()
        with torch.no_grad():
            for idx in batches:
                # One sorted fancy index per batch: a memmap reads only those patches.
                img, patch = rows[idx // k], idx % k
                x = torch.from_numpy(np.ascontiguousarray(array[img, patch]))
                backbone(normalize_batch(x.to(device), backbone.mean, backbone.std,
                                         backbone.input_size))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        backbone.eval()
    return int(len(flat))
