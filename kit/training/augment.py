"""Training augmentation: the patch-level albumentations pipeline, batch normalisation on
tensors, CutMix, and the two class-imbalance remedies (loss weights, balanced sampler).

The pipeline works on uint8 ``H x W x 3`` patches in the data loader; normalisation and
resizing run on the batch as tensors (on the GPU when there is one), see
:func:`normalize_batch`. Defaults live in ``kit/conf/augment.yaml``.
"""
from __future__ import annotations

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

from kit.config import given
from kit.utils import KitError, check_random_state

# --------------------------------------------------------------------------- patch pipeline


def build_train_transform(cfg: dict, seed: int | None = None):
    """The albumentations training pipeline: flips, 90-degree rotations, H&E stain jitter
    (``he_stain``, off by default), colour jitter.

    Parameters
    ----------
    cfg : dict
        The resolved ``augment`` config group (the ``augment`` section of the train config).
    seed : int, optional
        Seed of the pipeline's own random state (albumentations ignores the global seeds),
        see :func:`seed_transform`; ``None`` draws fresh entropy.

    Returns
    -------
    albumentations.Compose
        ``transform(image=uint8 HxWx3)["image"]`` is a uint8 array of the same shape.
    """
    import albumentations as A

    cfg = given(cfg, "augment")
    jitter = cfg["color_jitter"]
    b, c, s, h = (float(jitter[k]) for k in ("brightness", "contrast", "saturation", "hue"))
    steps = [
        A.HorizontalFlip(p=float(cfg["hflip"])),
        A.VerticalFlip(p=float(cfg["vflip"])),
        A.RandomRotate90(p=float(cfg["rot90"])),
    ]
    stain = cfg["he_stain"]
    if stain["p"] > 0:
        if not hasattr(A, "HEStain"):  # added in albumentations 2.0.x (early 2025)
            raise KitError(f"augment.he_stain needs albumentations' HEStain, which "
                           f"albumentations {A.__version__} lacks; install the pinned "
                           "albumentations==2.0.8 (requirements.txt) or set he_stain.p: 0")
        # Left out at p = 0 rather than added with p = 0: its coin flip would consume a draw
        # of the shared random stream and change every later draw of an existing recipe.
        steps.append(A.HEStain(
            method=stain["method"], preset=stain["preset"] if stain["method"] == "preset" else None,
            intensity_scale_range=(1 - float(stain["scale"]), 1 + float(stain["scale"])),
            intensity_shift_range=(-float(stain["shift"]), float(stain["shift"])),
            augment_background=bool(stain["augment_background"]), p=float(stain["p"])))
    steps.append(A.ColorJitter(brightness=(1 - b, 1 + b), contrast=(1 - c, 1 + c),
                               saturation=(1 - s, 1 + s), hue=(-h, h), p=float(jitter["p"])))
    transform = A.Compose(steps)
    if seed is not None:
        seed_transform(transform, seed)
    return transform


def seed_transform(transform, seed: int) -> None:
    """Reseed an albumentations pipeline: one random stream shared by all its transforms.

    Do not use ``Compose(seed=...)`` / ``set_random_seed``: albumentations 2.0.8 gives every
    transform its own generator seeded with the *same* seed, so the horizontal and vertical
    flips always fire together and half of the dihedral views never occur. Data-loader
    workers each hold a copy of the pipeline: call this in ``worker_init_fn`` with a
    per-worker seed, or every worker repeats the same draws.
    """
    import random

    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


# --------------------------------------------------------------------------- CutMix
class CutMix(Mixup):
    """timm's ``Mixup`` restricted to CutMix, one box per batch, and accepting odd batches.

    ``mixer(x, y) -> (x, soft_y)`` pastes the same box from sample ``B-1-i`` into sample ``i``
    (in place) and mixes the labels by area: ``lam * onehot(y_i) + (1 - lam) * onehot(y_j)``,
    ``lam`` = the unpasted fraction (timm's ``correct_lam`` accounts for boxes clipped by
    the border). Draws come from numpy's global state, which ``seed_everything`` seeds.
    """

    def __init__(self, alpha: float, num_classes: int, label_smoothing: float = 0.0):
        super().__init__(mixup_alpha=0.0, cutmix_alpha=alpha, prob=1.0, mode="batch",
                         correct_lam=True, label_smoothing=label_smoothing,
                         num_classes=num_classes)

    def __call__(self, x: torch.Tensor, target: torch.Tensor):
        n = len(x)
        if n % 2 == 0:
            return super().__call__(x, target)
        # timm pairs sample i with B-1-i and asserts an even batch (the last batch of an
        # epoch often is odd). We mix the first B-1 samples and leave the last one whole with
        # its own exact label: every sample still counts in the loss and no label is wrong,
        # whereas dropping it would silently shrink the data seen per epoch.
        last = mixup_target(target[-1:], self.num_classes, 1.0, self.label_smoothing)
        if n == 1:
            return x, last
        _, head = super().__call__(x[:-1], target[:-1])  # x[:-1] is a view: mixed in place
        return x, torch.cat([head, last])


def create_mixer(alpha: float, num_classes: int, label_smoothing: float = 0.0) -> CutMix | None:
    """A :class:`CutMix` (a timm ``Mixup``), or ``None`` when ``alpha == 0`` (CutMix off).

    ``alpha`` (``augment.cutmix_alpha``, >= 0) and ``label_smoothing`` (in [0, 1)) are
    settings kit.schema checked.
    """
    if alpha == 0:
        return None
    return CutMix(float(alpha), int(num_classes), float(label_smoothing))


# --------------------------------------------------------------------------- imbalance
def _labels(labels, num_classes: int | None = None) -> np.ndarray:
    """Labels as a checked 1-d integer array (classes in ``0..num_classes-1`` when given)."""
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if num_classes is None and y.size and np.issubdtype(y.dtype, np.integer):
        num_classes = int(y.max()) + 1
    if y.ndim != 1 or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
        raise KitError(f"labels must be a non-empty 1-d array of class indices (got shape "
                       f"{y.shape}, dtype {y.dtype})")
    if y.min() < 0 or y.max() >= num_classes:
        raise KitError(f"labels must lie in 0..{num_classes - 1} (found {y.min()}..{y.max()})")
    return y


def class_weights(labels, num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights for the loss, normalised to a mean sample weight of 1.

    ``w_c = N / (K * n_c)`` with ``K`` the number of classes present (scikit-learn's
    "balanced"); a class absent from ``labels`` gets weight 0.
    """
    y = _labels(labels, num_classes)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = len(y) / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def balanced_sampler(labels, seed, weight=None) -> torch.utils.data.WeightedRandomSampler:
    """A sampler drawing every class equally often (with replacement), ``len(labels)`` per
    epoch; ``weight`` (per sample) multiplies each sample's chance within its class."""
    y = _labels(labels)
    if weight is None:
        w = 1.0 / np.bincount(y)[y]
    else:  # each class still drawn equally often: weights are shares within their class
        w = np.asarray(weight, np.float64)
        totals = np.bincount(y, weights=w)
        w = np.divide(w, totals[y], out=np.zeros_like(w), where=totals[y] > 0)
    return _sampler(w, seed)


def weighted_sampler(weight, seed) -> torch.utils.data.WeightedRandomSampler:
    """A sampler drawing each sample with probability proportional to ``weight`` (with
    replacement), ``len(weight)`` per epoch: sample weights applied by sampling, which in
    expectation is the weighted loss, the same way on pixels and on cached embeddings."""
    return _sampler(np.asarray(weight, np.float64), seed)


def _sampler(w: np.ndarray, seed) -> torch.utils.data.WeightedRandomSampler:
    if len(w) == 0 or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise KitError("sampler: sample weights must be finite, non-negative and not all zero")
    generator = torch.Generator()
    generator.manual_seed(int(check_random_state(seed).integers(2**63 - 1)))
    return torch.utils.data.WeightedRandomSampler(
        torch.as_tensor(w, dtype=torch.double), num_samples=len(w), replacement=True,
        generator=generator)
