"""What a fold's model is saved as and loaded from, and digests of module states."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from kit.utils import KitError, atomic_path


def checkpoint_keys(model: nn.Module, full: bool) -> list[str]:
    """State-dict keys a checkpoint keeps: all, or trainable parameters plus every buffer."""
    sd_keys = list(model.state_dict().keys())
    if full:
        return sd_keys
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in model.named_buffers()}
    return [k for k in sd_keys if k in keep]


def save_checkpoint(model: nn.Module, path: str | os.PathLike, full: bool, meta: dict) -> Path:
    """Save a state dict (``full`` or trainable parts + buffers) and plain metadata, atomically."""
    sd = model.state_dict()
    keys = checkpoint_keys(model, full)
    payload = {"state_dict": {k: sd[k].detach().cpu().clone() for k in keys},
               "full": bool(full), "meta": meta}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    A partial checkpoint must cover every trainable parameter of ``model``; the frozen ones
    come from how ``model`` was built (the same pretrained weights). Returns the metadata.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KitError(f"{path}: checkpoint not found; rerun ./run.sh cv") from None
    except Exception as exc:
        raise KitError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc}); "
                       "delete it and rerun ./run.sh cv") from None
    sd = payload["state_dict"]
    result = model.load_state_dict(sd, strict=bool(payload.get("full")))
    need = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(need - set(sd))
    if result.unexpected_keys or missing:
        raise KitError(f"{path}: checkpoint does not fit this model "
                       f"({len(missing)} trainable tensors missing, "
                       f"{len(result.unexpected_keys)} unexpected); same backbone and config?")
    return dict(payload.get("meta", {}))


def snapshot(model: nn.Module, keys=None) -> dict:
    """Copy of what training can change (trainable parameters and buffers); the frozen rest
    stays as it is, so restoring this snapshot restores the whole model.

    ``keys`` (default: :func:`checkpoint_keys` now) names what to copy: during gradual
    unfreezing, also the blocks still waiting for their epoch, which change later.
    """
    sd = model.state_dict()
    keys = checkpoint_keys(model, full=False) if keys is None else keys
    return {k: sd[k].detach().clone() for k in keys}


def weights_digest(module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes) in key order.

    Covers the weights however they were obtained (file, hub, seeded random init) and the
    BatchNorm running statistics that a frozen backbone in eval mode uses. A backbone whose
    statistics were recalibrated on data (:func:`kit.training.build.recalibrate_random`) carries
    ``state_digest``: its weights' digest before that, combined with the data's key, because
    re-estimated statistics differ in the last bits with the thread count while meaning the
    same thing, and processes sharing a cache or a study must agree on its key.
    """
    if getattr(module, "state_digest", None):
        return module.state_digest
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
