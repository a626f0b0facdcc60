"""Soft-target cross-entropy, one-hot targets with smoothing, and the learning-rate schedule."""
from __future__ import annotations

import math

import torch


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy with soft targets (CutMix); ``weight`` per class, normalised like torch's
    weighted ``cross_entropy`` (sum of weighted losses / sum of sample weights)."""
    logp = torch.log_softmax(logits.float(), dim=1)
    if weight is None:
        return -(target * logp).sum(1).mean()
    w = target * weight
    return -(w * logp).sum() / w.sum()


def one_hot(y: torch.Tensor, n_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot targets with label smoothing spread as in timm's ``mixup_target``."""
    off = smoothing / n_classes
    return torch.nn.functional.one_hot(y, n_classes).float() * (1 - smoothing) + off


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine down to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
