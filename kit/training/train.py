"""Training one model on the patches of some images and predicting patch probabilities.

The data path: a Dataset over (image, patch) pairs reads uint8 patches from the memory-mapped
cache and augments them with albumentations (on CPU, in DataLoader workers when there are
any); batches stay uint8 until they reach the device, where
:func:`kit.training.augment.normalize_batch` scales, normalises and resizes them, and CutMix
mixes them. Early stopping watches the macro F1 of the validation *images* (patch
probabilities aggregated per image), the challenge metric.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kit import CLASSES
from kit.config import dotted_to_nested, load_config, merge
from kit.metrics import aggregate, fast_macro_f1
from kit.utils import KitError, atomic_path, progress, seed_everything, sha256_text


# --------------------------------------------------------------------------- config
def train_config(overrides: dict | None = None, params: dict | None = None) -> dict:
    """The resolved training config: ``train.yaml`` with ``augment.yaml`` as ``augment``.

    Parameters
    ----------
    overrides : dict, optional
        Nested values merged over the defaults (keys must exist), applied last.
    params : dict, optional
        Dotted keys (``{"head.depth": 2, "augment.cutmix_alpha": 0.5, "lr": 3e-4}``), as in
        ``runs/tune/<bb>/best.yaml``; applied before ``overrides``.
    """
    cfg = load_config("train")
    cfg["augment"] = load_config("augment")
    if params:
        cfg = merge(cfg, dotted_to_nested(params, "params"), source="params")
    if overrides:
        cfg = merge(cfg, {k: v for k, v in overrides.items() if v is not None}, source="config")
    return _normalise(cfg)


def _normalise(cfg: dict) -> dict:
    """Checks and the settings one setting implies, so every consumer sees one form."""
    head = cfg["head"]
    head["type"] = str(head.get("type", "mlp")).lower()
    if head["type"] == "logreg":
        # A linear probe is fitted on image-mean embeddings; mean_logprob pooling of its
        # patch logits is that model exactly (and attention has nothing to train).
        head["pool"] = "mean_logprob"
    issues = cfg["label_issues"]
    mode = issues.get("mode")
    issues["mode"] = "off" if mode is False or mode is None else str(mode).lower()
    if issues["mode"] not in LABEL_ISSUE_MODES:
        raise KitError(f"train: label_issues.mode must be one of {', '.join(LABEL_ISSUE_MODES)} "
                       f"(got {mode!r})")
    if str(issues.get("model")) not in ("head", "logreg"):
        raise KitError(f"train: label_issues.model must be head or logreg "
                       f"(got {issues.get('model')!r})")
    bag = cfg.get("bag", 1)
    if isinstance(bag, bool) or not isinstance(bag, int) or bag < 1:
        raise KitError(f"train: bag must be an integer >= 1 (got {bag!r})")
    return cfg


LABEL_ISSUE_MODES = ("off", "drop", "weight")


def tta_views(spec) -> tuple[str, ...]:
    """View names from the ``tta`` config: ``none`` (original only), a set name of
    :mod:`kit.training.tta` (``flips``, ``dihedral``) or a list of view names."""
    from kit.training.tta import get_views

    if isinstance(spec, str) and spec.strip().lower() in ("none", "off", ""):
        return ("id",)
    return get_views(spec)


# --------------------------------------------------------------------------- device
def pick_device(name: str | None = None) -> torch.device:
    """``cuda`` if available, else ``mps``, else ``cpu``; a named device must be available."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    ok = {"cpu": True, "cuda": torch.cuda.is_available(),
          "mps": getattr(torch.backends, "mps", None) is not None
          and torch.backends.mps.is_available()}.get(dev.type, False)
    if not ok:
        raise KitError(f"device {name!r} is not available here; use --device cpu "
                       "(or leave --device out to pick the best one)")
    return dev


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """Autocast dtype for ``amp`` (auto|off|bf16|fp16) on ``device``; None = full precision."""
    amp = str(amp).lower()
    if amp not in ("auto", "off", "bf16", "fp16", "false", "none"):
        raise KitError(f"train: amp must be auto, off, bf16 or fp16 (got {amp!r})")
    if amp in ("off", "false", "none"):
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        # Emulated bf16 (e.g. a T4) is slower than fp16 with loss scaling.
        return torch.bfloat16 if _native_bf16() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _native_bf16() -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch without the argument
        return torch.cuda.is_bf16_supported()


def _flag(value, device: torch.device) -> bool:
    """``auto`` -> on CUDA only; otherwise the boolean value (``"false"`` is false)."""
    text = str(value).strip().lower()
    if text == "auto":
        return device.type == "cuda"
    if text in ("true", "false", "on", "off", "1", "0", "yes", "no"):
        return text in ("true", "on", "1", "yes")
    raise KitError(f"train: expected auto, true or false (got {value!r})")


def n_workers(value, device: torch.device) -> int:
    """DataLoader processes for ``num_workers`` (``auto``: 0 on CPU/MPS, up to 8 on CUDA)."""
    if str(value).lower() == "auto":
        # On a CPU the cores are busy with the model itself; extra processes only compete.
        return min(8, max(0, (os.cpu_count() or 1) - 1)) if device.type == "cuda" else 0
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        raise KitError(f"train: num_workers must be auto or an integer (got {value!r})")


# --------------------------------------------------------------------------- model
def build_model(backbone: str, cfg: dict, weights="auto", num_classes: int = len(CLASSES),
                patch_size: int | None = None, **backbone_kwargs):
    """Backbone (frozen but its norm layers and last ``unfreeze_last`` blocks) + MLP head.

    Returns
    -------
    (PatchClassifier, int)
        The model and its number of trainable parameters.
    """
    from kit.models.backbones import count_trainable, create_backbone, freeze_backbone
    from kit.models.heads import MILClassifier, PatchClassifier, create_head, is_mil

    bb = create_backbone(backbone, weights=weights, patch_size=patch_size,
                         phikon_mode=cfg.get("phikon_mode", "resize"), **backbone_kwargs)
    if int(cfg.get("input_size") or 0) > 0:
        bb.input_size = int(cfg["input_size"])  # normalize_batch resizes to it on the device
    freeze_backbone(bb, train_norm=cfg["train_norm"], unfreeze_last=cfg["unfreeze_last"])
    head = create_head(bb.num_features, num_classes, **cfg["head"])
    model = MILClassifier(bb, head) if is_mil(head) else PatchClassifier(bb, head)
    return model, count_trainable(model)


def recalibrate_random(backbone, cfg: dict, array, rows=None, device="cpu",
                       max_patches: int = 4096, data_key: str | None = None) -> int:
    """AdaBN for randomly initialised backbones (``recalibrate_bn: auto``): their BatchNorm
    statistics are re-estimated on the training patches, with a warning that random
    features carry little signal. Returns the patches used (0: nothing done).

    With ``data_key`` (the patch cache's key) the backbone gets a ``state_digest`` naming its
    weights before recalibration and the data (see :func:`kit.training.features.weights_digest`).
    """
    from kit.models.backbones import recalibrate_batchnorm

    when = str(cfg.get("recalibrate_bn", "auto")).strip().lower()
    if when not in ("auto", "true", "false"):
        raise KitError(f"train: recalibrate_bn must be auto, true or false (got {when!r})")
    random = str(backbone.weights_source).startswith("random")
    if when == "false" or (when == "auto" and not random):
        return 0
    bs = int(cfg.get("eval_batch_size") or 0) or 2 * int(cfg["batch_size"])
    before = None
    if data_key is not None:
        from kit.training.features import weights_digest

        before = weights_digest(backbone)
    used = recalibrate_batchnorm(backbone, array, rows, batch_size=bs, device=device,
                                 max_batches=max(1, max_patches // bs))
    if before is not None and used:
        rows_id = "all" if rows is None else sha256_text(",".join(map(str, np.asarray(rows))))
        backbone.state_digest = sha256_text(
            f"{before}|adabn|{data_key}|{rows_id}|{bs}|{max_patches}")
    if random:
        print(f"{backbone.name}: WARNING: random weights: features of a random frozen network "
              "carry little signal (BatchNorm statistics recalibrated on "
              f"{used} training patches); use pretrained weights for a real score")
    return used


def set_train_mode(model: nn.Module) -> None:
    """``model.train()``, except that norm layers with frozen parameters keep their statistics.

    A frozen BatchNorm in train mode would still move its running mean/variance, silently
    changing the "frozen" backbone.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


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
        raise KitError(f"{path}: checkpoint not found; rerun ./run.sh cv")
    except Exception as exc:
        raise KitError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc}); "
                       "delete it and rerun ./run.sh cv")
    sd = payload["state_dict"]
    result = model.load_state_dict(sd, strict=bool(payload.get("full")))
    need = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(need - set(sd))
    if result.unexpected_keys or missing:
        raise KitError(f"{path}: checkpoint does not fit this model "
                       f"({len(missing)} trainable tensors missing, "
                       f"{len(result.unexpected_keys)} unexpected); same backbone and config?")
    return dict(payload.get("meta", {}))


# --------------------------------------------------------------------------- data
class PatchDataset(torch.utils.data.Dataset):
    """Training samples: every patch of every listed image, labelled with its image's class.

    Item ``j`` is patch ``j % K`` of image ``rows[j // K]`` of ``array`` (N x K x P x P x 3
    uint8, typically a read-only memmap). ``__getitems__`` reads a whole batch with one
    fancy-indexing call, so there is no per-item Python overhead beyond the augmentation.
    """

    def __init__(self, array, rows, labels, transform=None):
        self.array = array
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.rows) != len(self.labels):
            raise ValueError("rows and labels differ in length")
        self.k = int(array.shape[1])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows) * self.k

    def patch_labels(self) -> np.ndarray:
        return np.repeat(self.labels, self.k)

    def __getitem__(self, j: int):
        x, y = self.__getitems__([j])
        return x[0], y[0]

    def __getitems__(self, js):
        js = np.asarray(js, dtype=np.int64)
        img, patch = js // self.k, js % self.k
        x = np.asarray(self.array[self.rows[img], patch])  # B x P x P x 3, one read
        if self.transform is not None:
            x = np.stack([self.transform(image=p)["image"] for p in x])
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(self.labels[img])


class ImageBagDataset(PatchDataset):
    """Training samples for attention heads: item ``j`` is all K patches of image
    ``rows[j]`` (``K x P x P x 3``, each patch augmented on its own) with the image's label."""

    bag = True

    def __len__(self) -> int:
        return len(self.rows)

    def patch_labels(self) -> np.ndarray:  # one sample per image here
        return self.labels

    def __getitems__(self, js):
        js = np.asarray(js, dtype=np.int64)
        x = np.asarray(self.array[self.rows[js]])  # B x K x P x P x 3, one read
        if self.transform is not None:
            x = np.stack([[self.transform(image=p)["image"] for p in bag] for bag in x])
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(self.labels[js])


def _identity_collate(batch):
    return batch


def _seed_worker(worker_id: int) -> None:
    # Each worker's albumentations pipeline gets its own seed, derived from the loader's
    # seeded generator (torch.initial_seed() = base_seed + worker_id): repeatable, distinct.
    info = torch.utils.data.get_worker_info()
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    transform = getattr(info.dataset, "transform", None)
    if transform is not None:
        from kit.training.augment import seed_transform

        seed_transform(transform, seed)


def make_loader(dataset: PatchDataset, cfg: dict, seed: int, device: torch.device,
                shuffle: bool = True, weight=None) -> torch.utils.data.DataLoader:
    """A seeded DataLoader over ``dataset`` following ``cfg`` (batch_size, num_workers,
    class_balance); ``weight`` per image makes the sampler draw by it."""
    g = torch.Generator().manual_seed(seed)
    sampler = sampler_for(dataset.patch_labels(), cfg, seed, weight,
                          1 if getattr(dataset, "bag", False) else dataset.k)
    if sampler is None:
        sampler = torch.utils.data.RandomSampler(dataset, generator=g) if shuffle else \
            torch.utils.data.SequentialSampler(dataset)
    workers = n_workers(cfg["num_workers"], device)
    bs = int(cfg["batch_size"])
    if getattr(dataset, "bag", False):  # batch_size counts patches on every path
        bs = max(2, bs // dataset.k)
    return torch.utils.data.DataLoader(
        dataset, batch_size=bs, sampler=sampler, num_workers=workers,
        collate_fn=_identity_collate, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0, worker_init_fn=_seed_worker if workers else None,
        generator=g, prefetch_factor=4 if workers else None)


def sampler_for(labels, cfg: dict, seed: int, weight=None, k: int = 1):
    """The weighted sampler of a training run (class balancing and/or per-image weights
    repeated over the ``k`` samples of each image), or None for plain shuffling."""
    w = None if weight is None else np.repeat(np.asarray(weight, np.float64), k)
    if cfg["class_balance"] != "sampler" and w is None:
        return None
    from kit.training.augment import balanced_sampler, weighted_sampler  # imports timm

    if cfg["class_balance"] == "sampler":
        return balanced_sampler(labels, seed, w)
    return weighted_sampler(w, seed)


# --------------------------------------------------------------------------- loss / schedule
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


# --------------------------------------------------------------------------- prediction
def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


@contextlib.contextmanager
def oom_as_kit_error(batch_size: int, device: torch.device, what: str):
    """Turn an out-of-memory error into a KitError that suggests a smaller --batch-size."""
    try:
        yield
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        if not _is_oom(exc):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise KitError(f"out of memory while {what} with batches of {batch_size} on {device}; "
                       f"rerun with a smaller --batch-size (e.g. {max(1, batch_size // 2)}); "
                       "finished outputs are kept")


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
    from kit.models.heads import is_mil
    from kit.training.augment import normalize_batch
    from kit.training.tta import apply_view

    device = torch.device(device)
    rows = np.arange(len(array)) if rows is None else np.asarray(rows, dtype=np.int64)
    k = int(array.shape[1])
    bb = model.backbone
    mil = is_mil(model)
    dtype = amp_dtype(device, amp)
    cl = _flag(channels_last, device)
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
                with _autocast(device, dtype):
                    logits = model(xv)
                p = torch.softmax(logits.float(), dim=1).cpu().numpy()
                out[v].append(p if mil else p.reshape(len(sel), k, -1))
    n_classes = None
    result = {}
    for v in views:
        if out[v]:
            result[v] = np.concatenate(out[v]).astype(np.float32)
        else:
            n_classes = n_classes or _n_outputs(model)
            result[v] = np.zeros((0, n_classes) if mil else (0, k, n_classes), np.float32)
    return result


def _n_outputs(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features


# --------------------------------------------------------------------------- epoch selection
EARLY_STOPPING = ("auto", "inner", "refit", "none", "oof")
# What ``auto`` means on each training path, chosen by measuring (README, bench honesty):
# heads on cached embeddings train in seconds, so a fixed budget of epochs costs nothing and
# scored best; on pixels an epoch costs minutes, and the inner split stops early on 80 % of
# the images (cheaper than today) without looking at the OOF rows.
AUTO_EARLY_STOPPING = {"feature_cache": "none", "pixels": "inner"}


def early_stopping_mode(cfg: dict, path: str = "pixels") -> str:
    """``cfg["early_stopping"]``, checked, with ``auto`` resolved for training ``path``
    (``pixels`` or ``feature_cache``): ``inner``, ``refit``, ``none`` or ``oof``."""
    mode = str(cfg.get("early_stopping", "auto")).strip().lower()
    if mode not in EARLY_STOPPING:
        raise KitError(f"train: early_stopping must be one of {', '.join(EARLY_STOPPING)} "
                       f"(got {cfg.get('early_stopping')!r})")
    return AUTO_EARLY_STOPPING[path] if mode == "auto" else mode


def is_honest(mode: str) -> bool:
    """Whether OOF scores of a fold trained with ``mode`` are free of epoch selection on them."""
    return mode != "oof"


def inner_split(y, groups=None, n_splits: int = 5, seed: int = 42):
    """Positions ``(fit, stop)`` of an inner split of a fold's training images.

    One of ``n_splits`` stratified, grouped folds (``groups``: images that must stay together,
    e.g. a shared mask; default: each image alone), drawn with ``seed``. The number of splits
    shrinks when a class has too few images, down to 2.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    smallest = int(np.bincount(np.unique(y, return_inverse=True)[1]).min()) if len(y) else 0
    n = max(2, min(int(n_splits), smallest, len(np.unique(groups))))
    if len(y) < 4 or len(np.unique(groups)) < 2:
        raise KitError(f"train: {len(y)} training images are too few for an inner early-stopping "
                       "split; use --early-stopping none (a fixed number of epochs)")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" on tiny sets
        splitter = StratifiedGroupKFold(n_splits=n, shuffle=True,
                                        random_state=int(seed) % 2**32)
        try:
            fit, stop = next(iter(splitter.split(np.zeros(len(y)), y, groups)))
        except ValueError:  # every class smaller than the splits: grouped, not stratified
            from kit.utils import check_random_state

            uniq = check_random_state(seed).permutation(np.unique(groups))
            held = np.isin(groups, uniq[:max(1, len(uniq) // n)])
            fit, stop = np.flatnonzero(~held), np.flatnonzero(held)
    return np.sort(fit), np.sort(stop)


# --------------------------------------------------------------------------- fitting
BAG_SEED_STRIDE = 1009  # bag member b of a fold seeded seed + 1009 b: member 0 is the unbagged run


def member_seed(seed: int, member: int) -> int:
    """Seed of bag member ``member`` (``train.bag``) of a fold seeded ``seed``: its own head
    initialisation, sampler order, view draws and inner split."""
    return int(seed) + BAG_SEED_STRIDE * int(member)


def _snapshot(model: nn.Module) -> dict:
    """Copy of what training can change (trainable parameters and buffers); the frozen rest
    stays as it is, so restoring this snapshot restores the whole model."""
    sd = model.state_dict()
    return {k: sd[k].detach().clone() for k in checkpoint_keys(model, full=False)}


@dataclass
class FoldResult:
    """What :func:`fit` returns; ``model`` holds the chosen epoch's weights.

    ``best_score`` is the macro F1 on the rows that chose the epoch (``selection["stop"]``):
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


class Trainer:
    """The optimisation side of training: optimiser, schedule, precision, CutMix and loss.

    ``epoch(batches, prepare)`` runs one pass of the kit's loop (raw batch -> ``prepare`` ->
    forward, backward, step); ``prepare`` turns a batch of the data source into the model's
    input and soft target (pixels: to the device, normalise, mix; cached embeddings: pick the
    vectors). ``step(x, target)`` is the bare forward/backward/step on a ready batch, which
    the training benchmark compares the loop with.
    """

    def __init__(self, model: nn.Module, cfg: dict, device: torch.device, train_y,
                 steps_per_epoch: int):
        from kit.training.augment import class_weights, create_mixer

        self.model, self.cfg, self.device = model, cfg, torch.device(device)
        self.n_classes = _n_outputs(model)
        self.smoothing = float(cfg.get("label_smoothing", 0.0))
        self.mixer = create_mixer(cfg["augment"]["cutmix_alpha"], self.n_classes, self.smoothing)
        balance = cfg["class_balance"]
        if balance not in ("none", "loss", "sampler"):
            raise KitError(f"train: class_balance must be none, loss or sampler (got {balance!r})")
        self.weight = None
        if balance == "loss":
            self.weight = torch.as_tensor(class_weights(np.asarray(train_y, np.int64),
                                                        self.n_classes),
                                          dtype=torch.float32, device=self.device)
        model.to(self.device)
        self.channels_last = _flag(cfg["channels_last"], self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.dtype = amp_dtype(self.device, cfg["amp"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise KitError("train: the model has no trainable parameters")
        # fused: one kernel per step instead of a dozen per tensor (a third of a small head's
        # step on a CPU)
        self.opt = torch.optim.AdamW(params, lr=float(cfg["lr"]),
                                     weight_decay=float(cfg["weight_decay"]),
                                     fused=self.device.type in ("cpu", "cuda"))
        steps = max(1, int(steps_per_epoch))
        total = int(cfg["epochs"]) * steps
        warmup = int(round(float(cfg["warmup_epochs"]) * steps))
        min_ratio = float(cfg["min_lr_ratio"])
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: warmup_cosine(s, total, warmup, min_ratio))

    def prepare(self, xb: torch.Tensor, yb: torch.Tensor, mix: bool = True):
        """uint8 ``B x P x P x 3`` batch and labels -> normalised (mixed) input and soft target."""
        from kit.training.augment import normalize_batch

        bb = self.model.backbone
        bag = xb.dim() == 5  # B x K x P x P x 3: whole images for an attention head
        flat = xb.reshape(-1, *xb.shape[-3:]) if bag else xb
        x = normalize_batch(flat.to(self.device, non_blocking=True), bb.mean, bb.std,
                            bb.input_size)
        y = yb.to(self.device, non_blocking=True)
        if bag:  # CutMix mixes patches of two classes; an image bag keeps its own label
            return x.reshape(*xb.shape[:2], *x.shape[1:]), one_hot(y, self.n_classes,
                                                                   self.smoothing)
        if mix and self.mixer is not None:
            x, target = self.mixer(x, y)
        else:
            target = one_hot(y, self.n_classes, self.smoothing)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, target

    def step(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Forward, loss, backward, optimiser and schedule step; returns the (detached) loss."""
        with _autocast(self.device, self.dtype):
            logits = self.model(x)
        loss = soft_cross_entropy(logits, target, self.weight)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return loss.detach()

    def epoch(self, loader, desc: str = "train", prepare=None) -> float:
        """One pass over ``loader``; returns the mean training loss."""
        prepare = prepare or self.prepare
        set_train_mode(self.model)
        total, n = torch.zeros((), device=self.device), 0
        bs = int(self.cfg["batch_size"])
        with oom_as_kit_error(bs, self.device, "training"):
            for xb, yb in progress(loader, desc=desc, unit="batch", leave=False):
                if len(xb) < 2:
                    continue  # a lone last patch: BatchNorm cannot train on one sample
                x, target = prepare(xb, yb)
                # Summed on the device: a .item() per batch would stall a GPU pipeline.
                total += self.step(x, target) * len(x)
                n += len(x)
        return float(total) / max(1, n)


class PixelSource:
    """Training batches of augmented uint8 patches from an ``N x K x P x P x 3`` array.

    The data side of :func:`fit` on the pixel path; :class:`kit.training.features.FeatureSource` is
    the same interface over cached embeddings.
    """

    path = "pixels"  # the training path, for early_stopping: auto

    def __init__(self, array, cfg: dict, device: torch.device | str = "cpu"):
        self.array, self.cfg, self.device = array, cfg, torch.device(device)

    def loader(self, rows, y, seed: int, weight=None):
        """A re-iterable loader over the patches of ``rows`` (one pass = one epoch);
        ``weight`` per image: drawn by it (sample weights)."""
        from kit.models.heads import is_mil_config
        from kit.training.augment import build_train_transform

        cls = ImageBagDataset if is_mil_config(self.cfg["head"]) else PatchDataset
        ds = cls(self.array, rows, y, build_train_transform(self.cfg["augment"], seed=seed))
        return make_loader(ds, self.cfg, seed, self.device, weight=weight)

    def prepare_fn(self, trainer: Trainer):
        return trainer.prepare

    @torch.no_grad()
    def features(self, model: nn.Module, rows, max_patches: int = 4096) -> torch.Tensor:
        """Backbone features (``id`` view, eval mode) of up to ``max_patches`` patches of
        ``rows``, evenly spread over them: the statistics of the head's standardisation."""
        from kit.training.augment import normalize_batch

        rows = np.asarray(rows, np.int64)
        k = int(self.array.shape[1])
        flat = np.arange(len(rows) * k)
        if len(flat) > max_patches:
            flat = flat[np.linspace(0, len(flat) - 1, max_patches).round().astype(np.int64)]
        bb = model.backbone
        bb.to(self.device)
        was_training = bb.training
        bb.eval()
        bs = int(self.cfg.get("eval_batch_size") or 0) or 2 * int(self.cfg["batch_size"])
        out = []
        dtype = amp_dtype(self.device, self.cfg["amp"])
        with oom_as_kit_error(bs, self.device, "computing feature statistics"):
            for a in range(0, len(flat), bs):
                sel = flat[a:a + bs]
                x = torch.from_numpy(np.ascontiguousarray(
                    self.array[rows[sel // k], sel % k]))
                x = normalize_batch(x.to(self.device), bb.mean, bb.std, bb.input_size)
                with _autocast(self.device, dtype):
                    out.append(bb(x).float())
        bb.train(was_training)
        return torch.cat(out)

    def attention(self, model: nn.Module, rows) -> np.ndarray | None:
        """An attention model's weights ``n x K`` over the patches of ``rows`` (``id`` view);
        None for a patch head."""
        from kit.models.heads import is_mil

        if not is_mil(model):
            return None
        rows = np.asarray(rows, np.int64)
        k = int(self.array.shape[1])
        feats = self.features(model, rows, max_patches=len(rows) * k)
        with torch.no_grad():
            model.head.eval()
            return model.head.attention(feats.reshape(len(rows), k, -1)).float().cpu().numpy()

    def image_probs(self, model: nn.Module, rows, views=("id",), desc: str = "predict"):
        """Image probabilities of ``rows`` per view (patch probabilities aggregated)."""
        cfg = self.cfg
        eval_bs = int(cfg.get("eval_batch_size") or 0) or 2 * int(cfg["batch_size"])
        patch = predict(model, self.array, rows, tuple(views), eval_bs, self.device, cfg["amp"],
                        cfg["channels_last"], desc=desc)
        # An attention model predicts images already (n x C); patch heads give n x K x C.
        return {v: p if p.ndim == 2 else aggregate(p, cfg["head"]["pool"])
                for v, p in patch.items()}


def fit(model: nn.Module, source, train_rows, train_y, cfg: dict, *, val_rows=None, val_y=None,
        groups=None, seed: int = 42, device: torch.device | str = "cpu",
        desc: str = "train", sample_weight=None) -> FoldResult:
    """The kit's one training loop: train ``model`` on ``train_rows`` of ``source``.

    A head that standardises its inputs (:class:`kit.models.heads.Standardize`) gets its
    statistics from the features of all ``train_rows`` first (no labels). How the epoch is
    chosen follows ``cfg["early_stopping"]`` (:data:`EARLY_STOPPING`): ``inner`` stops early
    on an inner split of ``train_rows`` (:func:`inner_split`, from ``groups`` and ``seed``)
    and keeps its best epoch; ``refit`` then retrains from the same
    initial weights on all of ``train_rows`` for that many epochs; ``none`` trains
    ``cfg["epochs"]`` and keeps the last; ``oof`` stops early on ``val_rows`` (optimistic
    when those rows are then scored). Only ``oof`` reads ``val_rows``/``val_y``.

    Parameters
    ----------
    model : nn.Module
        Frozen as it should be; parameters with ``requires_grad`` are optimised.
    source : PixelSource or kit.training.features.FeatureSource
        ``loader(rows, y, seed)``, ``prepare_fn(trainer)``, ``image_probs(model, rows, views)``.
    train_rows, train_y : int arrays
        Rows of the source and their class indices.
    seed : int
        Seeds torch, numpy, the sampler, the augmentation and the inner split.
    sample_weight : array, optional
        Per training image: the sampler draws images in proportion to it.

    A closed-form head (``head.type: logreg``) is fitted by :func:`kit.training.probe.fit_probe`
    instead of this loop.

    Returns
    -------
    FoldResult
    """
    from kit.models.backbones import count_trainable
    from kit.models.heads import is_probe, standardizer

    if is_probe(model):
        from kit.training.probe import fit_probe

        return fit_probe(getattr(model, "head", model), source, train_rows, train_y, cfg,
                         groups=groups, seed=seed, desc=desc, sample_weight=sample_weight)

    t0 = time.perf_counter()
    device = torch.device(device)
    mode = early_stopping_mode(cfg, getattr(source, "path", "pixels"))
    train_rows = np.asarray(train_rows, np.int64)
    train_y = np.asarray(train_y, np.int64)
    if len(train_rows) == 0:
        raise KitError(f"{desc}: no training images")
    weight = None if sample_weight is None else np.asarray(sample_weight, np.float64)
    selection = {"early_stopping": mode, "epochs_honest": is_honest(mode)}
    fit_pos = np.arange(len(train_rows))
    stop_rows = stop_y = None
    if mode == "oof":
        if val_rows is None or len(val_rows) == 0:
            raise KitError(f"{desc}: early_stopping oof needs the fold's validation images")
        stop_rows, stop_y = np.asarray(val_rows, np.int64), np.asarray(val_y, np.int64)
        selection["stop"] = "the fold's own validation images (OOF rows): optimistic"
    elif mode in ("inner", "refit"):
        n_splits = int(cfg.get("inner_folds", 5))
        fit_pos, stop_pos = inner_split(train_y, groups, n_splits, seed)
        stop_rows, stop_y = train_rows[stop_pos], train_y[stop_pos]
        selection.update(stop="inner split of the training images", inner_folds=n_splits,
                         inner_seed=int(seed), stop_positions=stop_pos.tolist())
    std = standardizer(model)
    if std is not None:
        # From all the fold's training images (features only, no labels), before any step.
        std.fit(source.features(model, train_rows))
        selection["standardized"] = True
    seed_everything(seed)
    initial = _snapshot(model) if mode == "refit" else None
    run = _train(model, source, train_rows[fit_pos], train_y[fit_pos], cfg, stop_rows, stop_y,
                 int(cfg["epochs"]), seed, device, desc,
                 None if weight is None else weight[fit_pos])
    history = run["history"]
    if mode == "refit":
        # The inner run chose the epoch count; the same initial weights and seed train on all
        # the fold's images for that many epochs (same schedule, so epoch E means the same).
        model.load_state_dict(initial, strict=False)
        seed_everything(seed)
        refit = _train(model, source, train_rows, train_y, cfg, None, None, run["epoch"], seed,
                       device, f"{desc} refit", weight)
        history = history + [{**h, "refit": True} for h in refit["history"]]
    selection.update(chosen_epoch=run["epoch"], stop_score=run["score"],
                     n_fit=int(len(fit_pos) if mode != "refit" else len(train_rows)),
                     n_stop=int(0 if stop_rows is None else len(stop_rows)))
    model.eval()
    return FoldResult(model=model, best_epoch=run["epoch"], best_score=run["score"],
                      epochs=len(history), seconds=time.perf_counter() - t0, history=history,
                      val_probs=run["probs"], n_trainable=count_trainable(model),
                      selection=selection)


def _train(model, source, rows, y, cfg, stop_rows, stop_y, epochs: int, seed: int, device,
           desc: str, weight=None) -> dict:
    """Train up to ``epochs`` epochs; with stop rows, keep the best epoch by their macro F1
    (patience from ``cfg``), else the last. The schedule always spans ``cfg["epochs"]``."""
    loader = source.loader(rows, y, seed) if weight is None else \
        source.loader(rows, y, seed, weight=weight)
    trainer = Trainer(model, cfg, device, y, len(loader))
    prepare = source.prepare_fn(trainer)
    patience = int(cfg["patience"])
    n_classes = trainer.n_classes
    best = {"score": float("nan"), "epoch": 0, "state": None, "probs": None}
    history = []
    for epoch in range(1, int(epochs) + 1):
        loss = trainer.epoch(loader, desc=f"{desc} epoch {epoch}/{epochs}", prepare=prepare)
        record = {"epoch": epoch, "loss": loss, "lr": trainer.opt.param_groups[0]["lr"]}
        history.append(record)
        if stop_rows is None:
            best.update(epoch=epoch)
            continue
        img = source.image_probs(model, stop_rows, ("id",), desc=f"{desc} stop")["id"]
        score = fast_macro_f1(stop_y, img.argmax(1), n_classes)
        record["val_macro_f1"] = score
        if best["state"] is None or score > best["score"]:
            best.update(score=score, epoch=epoch, probs=img, state=_snapshot(model))
        elif patience and epoch - best["epoch"] >= patience:
            break
    if best["state"] is not None:
        model.load_state_dict(best["state"], strict=False)
    best["history"] = history
    return best


def fit_fold(model: nn.Module, array, train_rows, train_y, val_rows, val_y, cfg: dict, *,
             seed: int = 42, device: torch.device | str = "cpu",
             ckpt_path: str | os.PathLike | None = None, full_checkpoint: bool = True,
             desc: str = "train", meta: dict | None = None, groups=None) -> FoldResult:
    """Train ``model`` on the patches of ``train_rows`` (pixel path of :func:`fit`).

    Parameters
    ----------
    model : PatchClassifier
        Frozen as it should be (see :func:`build_model`).
    array : N x K x P x P x 3 uint8 array (memmap fine)
    train_rows, val_rows : int arrays
        Image rows of ``array``; ``val_rows`` choose the epoch only with
        ``early_stopping: oof``.
    train_y, val_y : int arrays
        Class index per image.
    cfg : dict
        Resolved training config (:func:`train_config`).
    seed : int
        On CPU the same seed gives the same probabilities.
    ckpt_path : path, optional
        Where the chosen weights go (:func:`save_checkpoint`, atomic), written at the end.
    full_checkpoint : bool
        Save the whole state dict, or only the trainable parameters and buffers.
    groups : array, optional
        Group of each training image, kept together by the inner split.

    Returns
    -------
    FoldResult
    """
    device = torch.device(device)
    res = fit(model, PixelSource(array, cfg, device), train_rows, train_y, cfg,
              val_rows=val_rows, val_y=val_y, groups=groups, seed=seed, device=device, desc=desc)
    if ckpt_path is not None:
        save_checkpoint(res.model, ckpt_path, full_checkpoint, {
            **(meta or {}), "best_epoch": res.best_epoch, "best_macro_f1": res.best_score,
            "selection": {k: v for k, v in res.selection.items() if k != "stop_positions"}})
    return res
