"""Patches to a backbone's input: scale, resize and normalise a batch on its device."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kit.utils import KitError


def normalize_batch(x: torch.Tensor, mean, std, size: int | None = None,
                    channels_last: bool | None = None) -> torch.Tensor:
    """Scale, resize and normalise a batch of patches on whatever device it lives.

    Parameters
    ----------
    x : torch.Tensor
        ``B x H x W x 3`` (as the loader collates patches) or ``B x 3 x H x W``; uint8 in
        0..255 or floats in [0, 1].
    mean, std : sequence of 3 floats
        The backbone's normalisation (``Backbone.mean`` / ``.std``).
    size : int, optional
        Output side (``Backbone.input_size``); bilinear, antialiased when shrinking.
    channels_last : bool, optional
        Force the memory format; ``None`` keeps the one that comes for free (a ``B x H x W x 3``
        input stays channels-last, so no copy is made).

    Returns
    -------
    torch.Tensor
        float32 ``B x 3 x size x size``.
    """
    if x.ndim != 4:
        raise KitError(f"normalize_batch expects a 4-d batch, got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        if x.shape[-1] != 3:
            raise KitError(f"normalize_batch expects 3 channels, got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2)  # a view: the data stays channels-last in memory
    levels = x.dtype == torch.uint8  # values in 0..255 rather than [0, 1]
    if not levels or x.device.type != "cpu":
        x = x.float()  # uint8 kernels are a CPU speed-up; accelerators get floats
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        if x.dtype == torch.uint8:
            # torch's uint8 channels-last bilinear kernel is ~20x faster than float on a CPU
            # (the data path must not starve the model); it rounds to the nearest grey level.
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < max(x.shape[-2:]))
    # One pass computing (x / 255 - mean) / std as x * scale + shift (uint8 converted on the fly).
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    scale = 1 / (std * 255) if levels else 1 / std
    x = torch.addcmul(-mean / std, x, scale)
    if channels_last is None:
        return x
    return x.contiguous(memory_format=torch.channels_last if channels_last
                        else torch.contiguous_format)
