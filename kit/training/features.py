"""Embedding cache and heads trained on cached embeddings.

When nothing in the backbone trains (frozen *including* its norm layers, in eval mode), a
patch always maps to the same vector: embed every patch and each test-time view once, keep
the vectors on disk, and train only the head on them. A 5-fold head trial then costs seconds
on a CPU instead of hours. This is the ``features`` objective of ``./run.sh tune`` and what
``cv`` can use when its config trains nothing in the backbone (:func:`features_cv`).

Cache layout (one folder per split and key; a changed input gives a new key, so a stale cache
is never read)::

    runs/features/<backbone>/<split>-<key[:16]>/features.npy   N x K x V x D (float16/32)
                                               /meta.json      key, views, shapes, sources
                                               /config.yaml

The key hashes the backbone's name and state dict (weights *and* BatchNorm statistics), its
input size and normalisation, the patch cache key of the split, the views and the dtype, and
the autocast dtype when embedding ran under one (``amp``: bf16/fp16 vectors differ from
float32 ones in the last bits; a float32 run keeps the key it always had).

Heads train with the kit's one loop, :func:`kit.training.train.fit`, over a :class:`FeatureSource`
(the pixel path uses :class:`kit.training.train.PixelSource`): the optimiser, schedule,
class balancing and epoch selection (``early_stopping``) are the same code on both paths. The only
augmentation that exists in feature space is the choice of view, drawn at random per patch
and epoch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kit import CLASSES, PROB_COLUMNS
from kit.config import load_config
from kit.metrics import aggregate, collapse_reason, macro_f1, prob_frame, weighted_f1
from kit.utils import KitError, atomic_write_json, progress, sha256_text, write_config

CODE_VERSION = "features-1"
FILES = ("features.npy", "meta.json")
DTYPES = ("float16", "float32")


# --------------------------------------------------------------------------- cache key
def weights_digest(module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes) in key order.

    Covers the weights however they were obtained (file, hub, seeded random init) and the
    BatchNorm running statistics that a frozen backbone in eval mode uses. A backbone whose
    statistics were recalibrated on data (:func:`kit.training.train.recalibrate_random`) carries
    ``state_digest``: its weights' digest before that, combined with the data's key, because
    re-estimated statistics differ in the last bits with the thread count while meaning the
    same thing, and processes sharing a cache or a study must agree on its key.
    """
    import torch

    if getattr(module, "state_digest", None):
        return module.state_digest
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    patches (whole images), normalised on ``device`` as :func:`kit.training.train.predict` does.
    ``amp`` (auto|off|bf16|fp16, as in train.yaml) runs the forward pass under autocast; the
    vectors are stored as float32 either way.
    """
    import torch

    from kit.training.augment import normalize_batch
    from kit.training.train import amp_dtype
    from kit.training.tta import apply_view

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


def load_or_embed(backbone, patches, paths, split: str, views, cfg: dict | None = None,
                  device=None, digest: str | None = None) -> Features:
    """The cached embeddings of ``patches`` (a :class:`kit.data.patches.PatchSet`), computed now
    on a miss. Safe with several workers: each embeds into its own temporary folder and the
    first to finish renames it into place; the others drop theirs and read the winner's."""
    from numpy.lib.format import open_memmap

    import torch

    from kit.training.train import amp_dtype, pick_device

    cfg = load_config("features", cfg)
    dtype = str(cfg["dtype"])
    if dtype not in DTYPES:
        raise KitError(f"features.dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    views = cache_views(views)
    digest = digest or weights_digest(backbone)
    if device is None:
        device = pick_device(None if cfg["device"] == "auto" else cfg["device"])
    # auto resolves here (bf16/fp16 on CUDA, off elsewhere), so the key names what ran.
    autocast = {None: None, torch.bfloat16: "bf16", torch.float16: "fp16"}[
        amp_dtype(torch.device(device), cfg["amp"])]
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
                print(f"features: {backbone.name} {split}: {problem}; stored as {stored} "
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
        print(f"features: embedded {n} x {k} {split} patches x {len(views)} views with "
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


# --------------------------------------------------------------------------- head training
def _as_tensor(x):
    import torch

    if isinstance(x, torch.Tensor):
        return x.float()
    return torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy, even of a memmap


def predict_features(head, x, views=None, batch_size: int = 4096) -> dict[int, np.ndarray]:
    """Patch probabilities ``n x K x C`` per view index of ``x`` (``n x K x V x D``)."""
    import torch

    x = _as_tensor(x)
    n, k, n_views, d = x.shape
    views = range(n_views) if views is None else views
    device = next(head.parameters()).device
    head.eval()
    out = {}
    with torch.inference_mode():
        for v in views:
            flat = x[:, :, v].reshape(-1, d)
            parts = [torch.softmax(head(flat[a:a + batch_size].to(device)).float(), 1).cpu()
                     for a in range(0, len(flat), batch_size)]
            probs = torch.cat(parts) if parts else torch.zeros(0, _n_out(head))
            out[v] = probs.numpy().reshape(n, k, -1)
    return out


def _n_out(head) -> int:
    import torch

    return [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1].out_features


class _PatchLoader:
    """Batches of (patch, view) picks of cached embeddings; every pass draws a new order and a
    random cached view per patch (the only augmentation that exists in feature space)."""

    def __init__(self, n_patches: int, n_views: int, batch_size: int, sampler, generator):
        self.n, self.n_views, self.bs = n_patches, n_views, int(batch_size)
        self.sampler, self.g = sampler, generator

    def __len__(self) -> int:
        return max(1, math.ceil(self.n / self.bs))

    def __iter__(self):
        import torch

        order = torch.as_tensor(list(self.sampler), dtype=torch.int64)
        view = torch.randint(0, self.n_views, (len(order),), generator=self.g)
        for a in range(0, len(order), self.bs):
            yield order[a:a + self.bs], view[a:a + self.bs]


class _ImageLoader:
    """Batches of whole images for attention heads: image indices and a random cached view
    per patch (``B x K``)."""

    def __init__(self, n_images: int, k: int, n_views: int, batch_size: int, sampler, generator):
        self.n, self.k, self.n_views, self.bs = n_images, k, n_views, int(batch_size)
        self.sampler, self.g = sampler, generator

    def __len__(self) -> int:
        return max(1, math.ceil(self.n / self.bs))

    def __iter__(self):
        import torch

        order = torch.as_tensor(list(self.sampler), dtype=torch.int64)
        view = torch.randint(0, self.n_views, (len(order), self.k), generator=self.g)
        for a in range(0, len(order), self.bs):
            yield order[a:a + self.bs], view[a:a + self.bs]


def image_probs_from_features(head, x, views, pool: str,
                              batch_size: int = 4096) -> dict[int, np.ndarray]:
    """Image probabilities ``n x C`` per view index of ``x`` (``n x K x V x D``): patch
    probabilities pooled by ``pool``, or an attention head's own image prediction."""
    import torch

    from kit.models.heads import is_mil

    if not is_mil(head):
        patch = predict_features(head, x, views, batch_size)
        return {v: aggregate(patch[v], pool) for v in views}
    x = _as_tensor(x)
    device = next(head.parameters()).device
    per = max(1, batch_size // max(1, x.shape[1]))
    head.eval()
    out = {}
    with torch.inference_mode():
        for v in views:
            parts = [torch.softmax(head(x[a:a + per, :, v].to(device)).float(), 1).cpu()
                     for a in range(0, len(x), per)]
            out[v] = (torch.cat(parts) if parts else torch.zeros(0, _n_out(head))).numpy()
    return out


def attention_weights(head, x, view: int = 0) -> np.ndarray:
    """An attention head's weights ``n x K`` over each image's patches in one view."""
    import torch

    with torch.inference_mode():
        device = next(head.parameters()).device
        return head.eval().attention(_as_tensor(x)[:, :, view].to(device)).float().cpu().numpy()


class FeatureSource:
    """Training batches from cached embeddings ``x`` (``n x K x V x D``): the data side of
    :func:`kit.training.train.fit` on the feature-cache path
    (:class:`kit.training.train.PixelSource` is the pixel one). Rows index the first axis
    of ``x``; view 0 is ``id``."""

    path = "feature_cache"  # the training path, for early_stopping: auto

    def __init__(self, x, cfg: dict, device="cpu"):
        import torch

        self.x, self.cfg, self.device = _as_tensor(x), cfg, torch.device(device)
        self._flat = None

    def loader(self, rows, y, seed: int, weight=None):
        import torch

        from kit.models.heads import is_mil_config
        from kit.training.train import sampler_for

        rows = np.asarray(rows, np.int64)
        n, k, n_views, d = self.x.shape
        if is_mil_config(self.cfg["head"]):
            return self._image_loader(rows, y, seed, weight)
        # The rows' patches, flattened and moved to the device once per training run.
        self._flat = self.x[_rows(rows)].reshape(len(rows) * k, n_views, d) \
            .to(self.device)
        self._patch_y = torch.from_numpy(np.repeat(np.asarray(y, np.int64), k)).to(self.device)
        g = torch.Generator().manual_seed(int(seed))
        sampler = sampler_for(np.repeat(np.asarray(y, np.int64), k), self.cfg, seed, weight, k)
        if sampler is None:
            sampler = torch.utils.data.RandomSampler(range(len(rows) * k), generator=g)
        return _PatchLoader(len(rows) * k, n_views, int(self.cfg["batch_size"]), sampler, g)

    def _image_loader(self, rows, y, seed: int, weight=None):
        import torch

        from kit.training.train import sampler_for

        n, k, n_views, d = self.x.shape
        self._images = self.x[_rows(rows)].to(self.device)  # rows x K x V x D
        self._image_y = torch.from_numpy(np.asarray(y, np.int64)).to(self.device)
        g = torch.Generator().manual_seed(int(seed))
        sampler = sampler_for(np.asarray(y, np.int64), self.cfg, seed, weight)
        if sampler is None:
            sampler = torch.utils.data.RandomSampler(range(len(rows)), generator=g)
        # batch_size counts patches, as on every path: whole images of K patches each.
        per = max(2, int(self.cfg["batch_size"]) // k)
        return _ImageLoader(len(rows), k, n_views, per, sampler, g)

    def prepare_fn(self, trainer):
        import torch

        from kit.models.heads import is_mil_config
        from kit.training.train import one_hot

        if is_mil_config(self.cfg["head"]):
            def prepare_images(idx, view):
                idx, view = idx.to(self.device), view.to(self.device)
                k = self._images.shape[1]
                patch = torch.arange(k, device=self.device)
                x = self._images[idx[:, None], patch[None, :], view]  # B x K x D
                return x, one_hot(self._image_y[idx], trainer.n_classes, trainer.smoothing)

            return prepare_images

        def prepare(idx, view):
            idx = idx.to(self.device)
            x = self._flat[idx, view.to(self.device)]
            return x, one_hot(self._patch_y[idx], trainer.n_classes, trainer.smoothing)

        return prepare

    def features(self, head, rows):
        """The cached vectors of ``rows`` (every patch and view), ``n x D``: the statistics of
        the head's standardisation."""
        return self.x[_rows(rows)].reshape(-1, self.x.shape[-1])

    def image_probs(self, head, rows, views=("id",), desc: str = "predict"):
        """Image probabilities of ``rows`` per view index or name (``id`` = 0)."""
        idx = [0 if v == "id" else v for v in views]
        probs = image_probs_from_features(head, self.x[_rows(rows)], idx,
                                          self.cfg["head"]["pool"])
        return {v: probs[i] for v, i in zip(views, idx)}


def train_head_on_features(x_train, y_train, x_val, y_val, cfg: dict, seed: int = 42,
                           device="cpu", num_classes: int = len(CLASSES),
                           desc: str = "head", groups=None):
    """Train a head (``cfg["head"]``) on cached embeddings with :func:`kit.training.train.fit`.

    Parameters
    ----------
    x_train, x_val : array or tensor, ``n x K x V x D``
        Embeddings per image, patch and view; view 0 is ``id`` (see :func:`cache_views`).
        ``x_val`` chooses the epoch only with ``early_stopping: oof``.
    y_train, y_val : int arrays
        Class index per image (every patch carries its image's label).
    cfg : dict
        Resolved training config (:func:`kit.training.train.train_config`).
    seed : int
        Seeds the head's initialisation, the patch order, the view draws and the inner split.

    Returns
    -------
    kit.training.train.FoldResult
        ``.head`` (= ``.model``) holds the chosen epoch's weights.
    """
    import torch

    from kit.models.heads import create_head
    from kit.training.train import fit
    from kit.utils import seed_everything

    x_train, x_val = _as_tensor(x_train), _as_tensor(x_val)
    y_train, y_val = np.asarray(y_train, np.int64), np.asarray(y_val, np.int64)
    if len(y_train) == 0:
        raise KitError(f"{desc}: no training images")
    seed_everything(seed)
    head = create_head(x_train.shape[-1], num_classes, **cfg["head"])
    source = FeatureSource(torch.cat([x_train, x_val]), cfg, device)
    n = len(y_train)
    return fit(head, source, np.arange(n), y_train, cfg, val_rows=np.arange(n, n + len(y_val)),
               val_y=y_val, groups=groups, seed=seed, device=device, desc=desc)


# --------------------------------------------------------------------------- cross-validation
@dataclass
class FoldPrediction:
    """One fold's image-level predictions (TTA mean over the config's views)."""

    fold: int
    sample_index: np.ndarray
    y: np.ndarray
    probs: np.ndarray  # n x C
    per_view: dict[str, np.ndarray]
    macro_f1: float
    fit: object  # kit.training.train.FoldResult (bag member 0)
    test_probs: np.ndarray | None = None
    test_per_view: dict[str, np.ndarray] | None = None
    members: list = field(default_factory=list)  # every bag member's FoldResult
    issues: object = None  # kit.training.label_issues.FoldIssues, when label_issues is on


class FeatureCV:
    """Cached embeddings aligned with the folds; :meth:`fold` trains and predicts one fold.

    Fold ``k`` is seeded with ``seed + k`` (as :func:`kit.training.cv.run_cv`), so a fold's
    result does not depend on which folds ran before it: the tune objective may visit folds in
    any order.
    """

    def __init__(self, train: Features, folds: pd.DataFrame, cfg: dict, views,
                 test: Features | None = None, device="cpu", seed: int = 42, threads: int = 1):
        import torch

        self.cfg, self.seed, self.device = cfg, int(seed), torch.device(device)
        self.threads = int(threads) if self.device.type == "cpu" else 0
        self.views = tuple(views)  # the config's TTA views, averaged in the predictions
        self.view_idx = [train.views.index(v) for v in self.views]
        self.train, self.test = train, test
        self.folds = _align(folds, train.samples, train.path)
        self.x = _as_tensor(train.array)  # n x K x V x D float32 in memory
        self.x_test = None if test is None else _as_tensor(test.array)
        self.n_folds = int(self.folds.fold.max()) + 1

    def configure(self, params: dict | None = None, cfg: dict | None = None) -> "FeatureCV":
        """A copy sharing the embeddings, with the training config resolved from ``params``
        (dotted keys) and ``cfg`` (nested overrides) over the defaults."""
        import copy

        from kit.training.train import train_config, tta_views

        tcfg = train_config(cfg, params)
        views = tta_views(tcfg["tta"])
        missing = [v for v in views if v not in self.train.views]
        if missing:
            raise KitError(f"views {', '.join(missing)} are not in the embedding cache "
                           f"{self.train.path} (it has {', '.join(self.train.views)}); "
                           "tune tta with the full objective")
        out = copy.copy(self)
        out.cfg, out.views = tcfg, tuple(views)
        out.view_idx = [self.train.views.index(v) for v in out.views]
        return out

    def fold(self, k: int, with_test: bool = False, exclude=()) -> FoldPrediction:
        """Train fold ``k``'s head on the other folds, predict its images (and the test set).

        ``exclude``: folds left out of training as well (nested tuning keeps its outer fold
        out of the inner search this way).
        """
        from kit.training.label_issues import find_fold_issues

        f = self.folds
        drop = {int(k)} | {int(e) for e in exclude}
        tr, va = f[~f.fold.isin(drop)], f[f.fold == k]
        seed = self.seed + k
        source = FeatureSource(self.x, self.cfg, self.device)
        with threads(self.threads):
            issues = None
            if self.cfg["label_issues"]["mode"] != "off":
                # From the fold's training rows alone: its own (OOF) labels decide nothing.
                issues = find_fold_issues(source, tr, self.cfg, seed, k, desc=f"fold {k} ")
            test = self.x_test if with_test else None
            members, per_view, test_per_view = train_bag(
                source, tr, va.row.values, va.y.values, self.cfg, seed, self.device,
                lambda m, x: self._image_probs(m, x), self.x[_rows(va.row)], test,
                issues=issues, desc=f"fold {k}")
        probs = np.mean(list(per_view.values()), axis=0)
        pred = FoldPrediction(k, va.sample_index.values, va.y.values, probs, per_view,
                              macro_f1(va.y.values, probs), members[0], members=members,
                              issues=issues)
        if test_per_view is not None:
            pred.test_per_view = test_per_view
            pred.test_probs = np.mean(list(test_per_view.values()), axis=0)
        return pred

    def _image_probs(self, head, x) -> dict[str, np.ndarray]:
        probs = image_probs_from_features(head, x, self.view_idx, self.cfg["head"]["pool"])
        return {v: probs[i] for v, i in zip(self.views, self.view_idx)}


def train_bag(source, tr: pd.DataFrame, val_rows, val_y, cfg: dict, seed: int, device, predict,
              x_val, x_test=None, issues=None, desc: str = "fold"):
    """Train ``cfg["bag"]`` heads on the training images ``tr`` (less those label issues
    drop, weighted as they say) and average their view probabilities.

    ``predict(head, x)`` gives ``{view: n x C}``. Returns ``(members, per_view, test_per_view)``
    with every member's :class:`kit.training.train.FoldResult`; member 0 is seeded ``seed``,
    so ``bag: 1`` trains exactly the unbagged head.
    """
    from kit.models.heads import create_head
    from kit.training.label_issues import training_weights
    from kit.training.train import fit, member_seed
    from kit.utils import seed_everything

    keep, weight = training_weights(issues, cfg)
    fit_tr = tr if keep is None else tr[keep]
    members, val_views, test_views = [], [], []
    n_bag = int(cfg.get("bag", 1))
    for b in range(n_bag):
        s = member_seed(seed, b)
        seed_everything(s)
        head = create_head(source.x.shape[-1], len(CLASSES), **cfg["head"])
        res = fit(head, source, fit_tr.row.values, fit_tr.y.values, cfg, val_rows=val_rows,
                  val_y=val_y, groups=fold_groups(fit_tr), seed=s, device=device,
                  desc=desc if n_bag == 1 else f"{desc} bag {b + 1}/{n_bag}",
                  sample_weight=None if weight is None else weight[keep])
        members.append(res)
        val_views.append(predict(res.model, x_val))
        if x_test is not None:
            test_views.append(predict(res.model, x_test))
    return members, mean_views(val_views), mean_views(test_views) if test_views else None


def mean_views(parts: list[dict]) -> dict:
    """Per view, the mean of the bag members' probabilities (one member: its own, as is)."""
    if len(parts) == 1:
        return parts[0]
    return {v: np.mean([p[v] for p in parts], axis=0) for v in parts[0]}


def fold_groups(frame: pd.DataFrame):
    """Groups the inner early-stopping split keeps together: the folds file's ``group``
    column when it has one (images sharing a mask or a near-duplicate), else None."""
    return frame.group.values if "group" in frame.columns else None


def _rows(series):
    import torch

    return torch.from_numpy(np.array(series, dtype=np.int64))  # pandas hands out read-only views


@contextlib.contextmanager
def threads(n: int):
    """Run with ``n`` torch threads (0: leave as is), restoring the count afterwards.

    A small head's matrices are too small to share among threads: on a CPU whose cores are
    also busy elsewhere, two threads were ~10x slower per step than one here.
    """
    import torch

    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _align(folds: pd.DataFrame, samples: pd.DataFrame, where) -> pd.DataFrame:
    """Folds with ``row`` (row of the cache) and ``y`` (class index) columns."""
    rows = pd.Series(np.arange(len(samples)), index=samples.sample_index.values)
    missing = sorted(set(folds.sample_index) - set(rows.index))
    if missing:
        raise KitError(f"{len(missing)} images of folds/folds.csv are not in the patch cache "
                       f"behind {where} (e.g. {missing[0]}); rerun ./run.sh patches and "
                       "./run.sh folds --force")
    return folds.assign(row=rows.loc[folds.sample_index].values,
                        y=[CLASSES.index(c) for c in folds.label])


def nothing_trains(cfg: dict) -> bool:
    """Whether a training config leaves the whole backbone frozen (no norm layer, no block),
    the case where :func:`features_cv` replaces cv's training at a fraction of the cost.

    In feature space the training augmentation is the random choice among the cached views;
    colour jitter and CutMix (pixel operations) have no equivalent there.
    """
    kinds = cfg.get("train_norm") or ()
    if isinstance(kinds, str):
        kinds = kinds.split(",")
    kinds = [str(k).strip().lower() for k in kinds if str(k).strip().lower() not in ("", "none")]
    return not kinds and int(cfg.get("unfreeze_last") or 0) == 0


def frozen_backbone(backbone: str, cfg: dict, weights="auto", seed: int = 42,
                    patch_size: int | None = None):
    """The backbone built as cv builds it (seeded), frozen entirely and in eval mode."""
    from kit.models.backbones import create_backbone, freeze_backbone
    from kit.utils import seed_everything

    seed_everything(seed)
    bb = create_backbone(backbone, weights=weights, patch_size=patch_size,
                         phikon_mode=cfg.get("phikon_mode", "resize"))
    freeze_backbone(bb, train_norm=(), unfreeze_last=0)
    return bb.eval()


def prepare(backbone, paths, params: dict | None = None, cfg: dict | None = None,
            weights="auto", seed: int = 42, device=None, with_test: bool = True,
            features_cfg: dict | None = None) -> FeatureCV:
    """Load folds and patches, embed (or read the cache), and return a :class:`FeatureCV`.

    ``backbone`` is a registered name or an already built :class:`kit.models.backbones.Backbone`;
    ``params`` (dotted keys) and ``cfg`` (nested overrides) resolve as in
    :func:`kit.training.cv.run_cv`.
    """
    from kit.data.folds import load_folds
    from kit.data.patches import load_patches
    from kit.training.train import pick_device, train_config, tta_views

    tcfg = train_config(cfg, params)
    views = tta_views(tcfg["tta"])
    folds, _ = load_folds(paths)
    train = load_patches(paths, "train")
    test = load_patches(paths, "test") if with_test else None
    fcfg = load_config("features", features_cfg)
    dev = pick_device(None if fcfg["device"] == "auto" else fcfg["device"]) \
        if device is None else pick_device(device)
    if isinstance(backbone, str):
        from kit.training.train import recalibrate_random

        backbone = frozen_backbone(backbone, tcfg, weights, seed,
                                   patch_size=int(train.array.shape[2]))
        if int(tcfg.get("input_size") or 0) > 0:
            backbone.input_size = int(tcfg["input_size"])  # as cv builds it
        recalibrate_random(backbone, tcfg, train.array, None, dev, data_key=train.key)
    digest = weights_digest(backbone)
    ftrain = load_or_embed(backbone, train, paths, "train", views, fcfg, dev, digest)
    ftest = load_or_embed(backbone, test, paths, "test", views, fcfg, dev, digest) \
        if test is not None else None
    return FeatureCV(ftrain, folds, tcfg, views, ftest, dev, seed, int(fcfg["threads"]))


@dataclass
class FeaturesCVResult:
    """:func:`features_cv`'s outputs, in the shapes of cv's files (docs/DESIGN.md)."""

    oof: pd.DataFrame  # sample_index, fold, label, p_<class>... (TTA mean), folds-file order
    per_fold: list[dict]
    test: pd.DataFrame | None  # sample_index, p_<class>... (mean over folds and views)
    oof_macro_f1: float
    oof_weighted_f1: float
    oof_views: dict[str, pd.DataFrame]
    test_views: dict[str, pd.DataFrame]
    views: tuple[str, ...]
    cfg: dict
    features: dict  # cache keys, folders, weights digest/source, hits

    def __iter__(self):  # ``oof, per_fold, test = features_cv(...)``
        return iter((self.oof, self.per_fold, self.test))


def features_cv(backbone, paths, params: dict | None = None, seed: int = 42,
                cfg: dict | None = None, weights="auto", device=None, folds=None,
                with_test: bool = True, on_fold=None) -> FeaturesCVResult:
    """Cross-validation of a head on cached embeddings: what ``cv`` computes when nothing in
    the backbone trains, for a fraction of the compute.

    Parameters
    ----------
    backbone : str or Backbone
    paths : kit.paths.Paths
    params, cfg : dict, optional
        Dotted overrides (best.yaml) and nested overrides, as in :func:`kit.training.cv.run_cv`.
    seed : int
        Fold ``k`` trains with ``seed + k``; the backbone is built after seeding ``seed``.
    folds : list of int, optional
        Only these folds (default: all); the OOF frame then covers their images only.
    on_fold : callable, optional
        ``on_fold(k, FoldPrediction)`` after each fold (progress, pruning).

    Returns
    -------
    FeaturesCVResult
        Unpacks as ``oof, per_fold, test``.
    """
    fcv = backbone if isinstance(backbone, FeatureCV) else prepare(
        backbone, paths, params, cfg, weights, seed, device, with_test)
    ks = list(range(fcv.n_folds)) if folds is None else [int(k) for k in folds]
    preds = []
    for k in progress(ks, desc="features cv", unit="fold"):
        pred = fcv.fold(k, with_test=with_test)
        preds.append(pred)
        if on_fold is not None:
            on_fold(k, pred)
    return _result(fcv, preds)


def _result(fcv: FeatureCV, preds: list[FoldPrediction]) -> FeaturesCVResult:
    order = fcv.folds[fcv.folds.fold.isin([p.fold for p in preds])].sample_index
    ids = np.concatenate([p.sample_index for p in preds])
    folds_col = np.concatenate([np.full(len(p.y), p.fold) for p in preds])
    labels = np.array([CLASSES[i] for i in np.concatenate([p.y for p in preds])], dtype=object)

    def ordered(probs):
        df = prob_frame(ids, probs, fold=folds_col, label=labels)
        return df.set_index("sample_index").loc[order.values].reset_index()

    oof = ordered(np.concatenate([p.probs for p in preds]))
    oof_views = {v: ordered(np.concatenate([p.per_view[v] for p in preds])) for v in fcv.views}
    test = test_views = None
    if preds and preds[0].test_probs is not None:
        tid = fcv.test.samples.sample_index.values
        test = prob_frame(tid, np.mean([p.test_probs for p in preds], axis=0))
        test_views = {v: prob_frame(tid, np.mean([p.test_per_view[v] for p in preds], axis=0))
                      for v in fcv.views}
    y, probs = oof.label.to_numpy(), oof[PROB_COLUMNS].to_numpy()
    per_fold = [{"fold": p.fold, "n": int(len(p.y)), "macro_f1": p.macro_f1,
                 "weighted_f1": weighted_f1(p.y, p.probs), "val_macro_f1_id": p.fit.best_score,
                 "best_epoch": p.fit.best_epoch, "epochs": p.fit.epochs,
                 "collapsed": collapse_reason(p.y, p.probs),
                 "seconds": round(p.fit.seconds, 2)} for p in preds]
    info = {"train_key": fcv.train.key, "train_dir": str(fcv.train.path),
            "train_hit": fcv.train.hit, "weights_sha256": fcv.train.meta.get("weights_sha256"),
            "weights_source": fcv.train.meta.get("weights_source")}
    if fcv.test is not None:
        info.update(test_key=fcv.test.key, test_dir=str(fcv.test.path), test_hit=fcv.test.hit)
    return FeaturesCVResult(oof, per_fold, test, macro_f1(y, probs), weighted_f1(y, probs),
                            oof_views, test_views or {}, fcv.views, fcv.cfg, info)
