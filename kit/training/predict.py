"""Patch probabilities of a model over the patch cache, per test-time view."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kit.models.heads import is_mil
from kit.models.normalize import normalize_batch
from kit.training.device import amp_dtype, auto_flag, autocast, oom_as_kit_error
from kit.training.tta import apply_view
from kit.utils import progress


@torch.no_grad()
def predict(model: nn.Module, array, rows=None, views=("id",), batch_size: int = 128,
            device: torch.device | str = "cpu", amp: str = "auto", channels_last="auto",
            desc: str | None = None) -> dict[str, np.ndarray]:
    """Patch probabilities of every patch of the listed images, per test-time view.

    Parameters
    ----------
    model : PatchClassifier
        Its ``backbone`` gives mean, std and input size.
    array : N x K x P x P x 3 uint8 array (memmap fine)
    rows : int array, optional
        Images to predict (default: all), in this order.
    views : sequence of str
        :mod:`kit.training.tta` view names.

    Returns
    -------
    dict view -> float32 array ``len(rows) x K x C``
    """
    device = torch.device(device)
    rows = np.arange(len(array)) if rows is None else np.asarray(rows, dtype=np.int64)
    k = int(array.shape[1])
    bb = model.backbone
    mil = is_mil(model)
    dtype = amp_dtype(device, amp)
    cl = auto_flag(channels_last, device)
    per_chunk = max(1, batch_size // k)
    out = {v: [] for v in views}
    model.eval()
    chunks = range(0, len(rows), per_chunk)
    with oom_as_kit_error(batch_size, device, "predicting"):
        for a in progress(chunks, desc=desc or "predict", unit="batch", leave=False):
            sel = rows[a:a + per_chunk]
            x = torch.from_numpy(np.ascontiguousarray(array[sel])).reshape(-1, *array.shape[2:])
            x = normalize_batch(x.to(device), bb.mean, bb.std, bb.input_size)
            for v in views:
                xv = apply_view(x, v)
                if cl:
                    xv = xv.contiguous(memory_format=torch.channels_last)
                if mil:
                    xv = xv.reshape(len(sel), k, *xv.shape[1:])
                with autocast(device, dtype):
                    logits = model(xv)
                p = torch.softmax(logits.float(), dim=1).cpu().numpy()
                out[v].append(p if mil else p.reshape(len(sel), k, -1))
    n_classes = None
    result = {}
    for v in views:
        if out[v]:
            result[v] = np.concatenate(out[v]).astype(np.float32)
        else:
            n_classes = n_classes or n_outputs(model)
            result[v] = np.zeros((0, n_classes) if mil else (0, k, n_classes), np.float32)
    return result


def n_outputs(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features
