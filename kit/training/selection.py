"""How a fit chooses what it keeps: early-stopping modes, the inner split of a fold's
training images, bag members' seeds, and the record of the choice."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from kit.utils import KitError, check_random_state

EARLY_STOPPING = ("auto", "inner", "refit", "none", "oof")
# What ``auto`` means on each training path, chosen by measuring (docs/training.md, bench honesty):
# heads on cached embeddings train in seconds, so a fixed budget of epochs costs nothing and
# scored best; on pixels an epoch costs minutes, and the inner split stops early on 80 % of
# the images (cheaper than today) without looking at the OOF rows.
AUTO_EARLY_STOPPING = {"feature_cache": "none", "pixels": "inner"}


def early_stopping_mode(cfg: dict, path: str = "pixels") -> str:
    """``cfg["early_stopping"]`` (checked by kit.schema) with ``auto`` resolved for training
    ``path`` (``pixels`` or ``feature_cache``): ``inner``, ``refit``, ``none`` or ``oof``."""
    mode = cfg["early_stopping"]
    return AUTO_EARLY_STOPPING[path] if mode == "auto" else mode


def is_honest(mode: str) -> bool:
    """Whether OOF scores of a fold trained with ``mode`` are free of epoch selection on them."""
    return mode != "oof"


def grouped_splits(y, groups=None, n_splits: int = 5, seed: int = 42,
                   too_few: str = "train: {n} training images are too few for an inner "
                                  "split") -> list[tuple[np.ndarray, np.ndarray]]:
    """Positions ``(fit, held)`` of every fold of a stratified, grouped K-fold of a fold's
    training images.

    ``groups``: images that must stay together (e.g. a shared mask; default: each image
    alone); drawn with ``seed``. The number of splits shrinks when a class has too few images,
    down to 2; when no stratified split exists, the groups are dealt into blocks in a seeded
    order (the last block takes the remainder). ``too_few`` (with ``{n}``) is the error for
    fewer than 4 images or a single group.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    smallest = int(np.bincount(np.unique(y, return_inverse=True)[1]).min()) if len(y) else 0
    n = max(2, min(int(n_splits), smallest, len(np.unique(groups))))
    if len(y) < 4 or len(np.unique(groups)) < 2:
        raise KitError(too_few.format(n=len(y)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" on tiny sets
        splitter = StratifiedGroupKFold(n_splits=n, shuffle=True,
                                        random_state=int(seed) % 2**32)
        try:
            return [(np.sort(a), np.sort(b))
                    for a, b in splitter.split(np.zeros(len(y)), y, groups)]
        except ValueError:  # every class smaller than the splits: grouped, not stratified
            uniq = check_random_state(seed).permutation(np.unique(groups))
            size = max(1, len(uniq) // n)
            blocks = [uniq[k * size:(k + 1) * size] for k in range(n - 1)]
            blocks.append(uniq[(n - 1) * size:])
            return [(np.flatnonzero(~np.isin(groups, b)), np.flatnonzero(np.isin(groups, b)))
                    for b in blocks]


def inner_split(y, groups=None, n_splits: int = 5, seed: int = 42):
    """Positions ``(fit, stop)`` of the inner split early stopping uses: the first fold of
    :func:`grouped_splits`."""
    return grouped_splits(y, groups, n_splits, seed,
                          too_few="train: {n} training images are too few for an inner "
                                  "early-stopping split; use --early-stopping none (a fixed "
                                  "number of epochs)")[0]


BAG_SEED_STRIDE = 1009  # bag member b of a fold seeded seed + 1009 b: member 0 is the unbagged run


def member_seed(seed: int, member: int) -> int:
    """Seed of bag member ``member`` (``train.bag``) of a fold seeded ``seed``: its own head
    initialisation, sampler order, view draws and inner split."""
    return int(seed) + BAG_SEED_STRIDE * int(member)


@dataclass
class FoldResult:
    """What :func:`fit` returns; ``model`` holds the chosen epoch's weights.

    ``best_score`` is the task's metric on the rows that chose the epoch (``selection["stop"]``):
    the inner split, the fold's own images for ``oof``, nothing for ``none`` (NaN).
    """
    model: nn.Module
    best_epoch: int
    best_score: float
    epochs: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    val_probs: np.ndarray | None = None  # image-level, view "id", chosen epoch, stop rows
    n_trainable: int = 0
    selection: dict = field(default_factory=dict)

    @property
    def head(self) -> nn.Module:  # the feature-cache path's name for the model
        return self.model
