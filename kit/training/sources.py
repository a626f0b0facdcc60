"""The data side of the training loop: batches and image probabilities from pixels
(:class:`PixelSource`) or from cached embeddings (:class:`FeatureSource`), one interface."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn

from kit.metrics import aggregate
from kit.models.heads import is_mil, is_mil_config
from kit.models.normalize import normalize_batch
from kit.training.device import amp_dtype, autocast, oom_as_kit_error
from kit.training.loaders import ImageBagDataset, PatchDataset, make_loader, sampler_for
from kit.training.losses import one_hot
from kit.training.predict import predict


class PixelSource:
    """Training batches of augmented uint8 patches from an ``N x K x P x P x 3`` array.

    The data side of :func:`fit` on the pixel path; :class:`kit.training.sources.FeatureSource` is
    the same interface over cached embeddings.
    """
    path = "pixels"  # the training path, for early_stopping: auto

    def __init__(self, array, cfg: dict, device: torch.device | str = "cpu"):
        self.array, self.cfg, self.device = array, cfg, torch.device(device)

    def loader(self, rows, y, seed: int, weight=None):
        """A re-iterable loader over the patches of ``rows`` (one pass = one epoch);
        ``weight`` per image: drawn by it (sample weights)."""
        from kit.training.augment import build_train_transform

        cls = ImageBagDataset if is_mil_config(self.cfg["head"]) else PatchDataset
        ds = cls(self.array, rows, y, build_train_transform(self.cfg["augment"], seed=seed))
        return make_loader(ds, self.cfg, seed, self.device, weight=weight)

    def prepare_fn(self, trainer):
        return trainer.prepare

    @torch.no_grad()
    def features(self, model: nn.Module, rows, max_patches: int = 4096) -> torch.Tensor:
        """Backbone features (``id`` view, eval mode) of up to ``max_patches`` patches of
        ``rows``, evenly spread over them: the statistics of the head's standardisation."""

        rows = np.asarray(rows, np.int64)
        k = int(self.array.shape[1])
        flat = np.arange(len(rows) * k)
        if len(flat) > max_patches:
            flat = flat[np.linspace(0, len(flat) - 1, max_patches).round().astype(np.int64)]
        bb = model.backbone
        bb.to(self.device)
        was_training = bb.training
        bb.eval()
        bs = int(self.cfg["eval_batch_size"]) or 2 * int(self.cfg["batch_size"])
        out = []
        dtype = amp_dtype(self.device, self.cfg["amp"])
        with oom_as_kit_error(bs, self.device, "computing feature statistics"):
            for a in range(0, len(flat), bs):
                sel = flat[a:a + bs]
                x = torch.from_numpy(np.ascontiguousarray(
                    self.array[rows[sel // k], sel % k]))
                x = normalize_batch(x.to(self.device), bb.mean, bb.std, bb.input_size)
                with autocast(self.device, dtype):
                    out.append(bb(x).float())
        bb.train(was_training)
        return torch.cat(out)

    def attention(self, model: nn.Module, rows) -> np.ndarray | None:
        """An attention model's weights ``n x K`` over the patches of ``rows`` (``id`` view);
        None for a patch head."""

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
        eval_bs = int(cfg["eval_batch_size"]) or 2 * int(cfg["batch_size"])
        patch = predict(model, self.array, rows, tuple(views), eval_bs, self.device, cfg["amp"],
                        cfg["channels_last"], desc=desc)
        # An attention model predicts images already (n x C); patch heads give n x K x C.
        return {v: p if p.ndim == 2 else aggregate(p, cfg["head"]["pool"])
                for v, p in patch.items()}


def as_tensor(x):
    if isinstance(x, torch.Tensor):
        return x.float()
    return torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy, even of a memmap


def predict_features(head, x, views=None, batch_size: int = 4096) -> dict[int, np.ndarray]:
    """Patch probabilities ``n x K x C`` per view index of ``x`` (``n x K x V x D``)."""

    x = as_tensor(x)
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
            probs = torch.cat(parts) if parts else torch.zeros(0, n_logits(head))
            out[v] = probs.numpy().reshape(n, k, -1)
    return out


def n_logits(head) -> int:
    return [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1].out_features


class _CachedBatches:
    """Batches of picks of cached embeddings: indices (patches, or whole images for attention
    heads) in a new sampled order every pass, each with a random cached view (one per patch:
    ``B`` views, or ``B x K`` with ``k``), the only augmentation that exists in feature space."""

    def __init__(self, n: int, n_views: int, batch_size: int, sampler, generator,
                 k: int | None = None):
        self.n, self.n_views, self.bs, self.k = n, n_views, int(batch_size), k
        self.sampler, self.g = sampler, generator

    def __len__(self) -> int:
        return max(1, math.ceil(self.n / self.bs))

    def __iter__(self):
        order = torch.as_tensor(list(self.sampler), dtype=torch.int64)
        shape = (len(order),) if self.k is None else (len(order), self.k)
        view = torch.randint(0, self.n_views, shape, generator=self.g)
        for a in range(0, len(order), self.bs):
            yield order[a:a + self.bs], view[a:a + self.bs]


def image_probs_from_features(head, x, views, pool: str,
                              batch_size: int = 4096) -> dict[int, np.ndarray]:
    """Image probabilities ``n x C`` per view index of ``x`` (``n x K x V x D``): patch
    probabilities pooled by ``pool``, or an attention head's own image prediction."""


    if not is_mil(head):
        patch = predict_features(head, x, views, batch_size)
        return {v: aggregate(patch[v], pool) for v in views}
    x = as_tensor(x)
    device = next(head.parameters()).device
    per = max(1, batch_size // max(1, x.shape[1]))
    head.eval()
    out = {}
    with torch.inference_mode():
        for v in views:
            parts = [torch.softmax(head(x[a:a + per, :, v].to(device)).float(), 1).cpu()
                     for a in range(0, len(x), per)]
            out[v] = (torch.cat(parts) if parts else torch.zeros(0, n_logits(head))).numpy()
    return out


def attention_weights(head, x, view: int = 0) -> np.ndarray:
    """An attention head's weights ``n x K`` over each image's patches in one view."""

    with torch.inference_mode():
        device = next(head.parameters()).device
        return head.eval().attention(as_tensor(x)[:, :, view].to(device)).float().cpu().numpy()


class FeatureSource:
    """Training batches from cached embeddings ``x`` (``n x K x V x D``): the data side of
    :func:`kit.training.train.fit` on the feature-cache path
    (:class:`kit.training.sources.PixelSource` is the pixel one). Rows index the first axis
    of ``x``; view 0 is ``id``."""

    path = "feature_cache"  # the training path, for early_stopping: auto

    def __init__(self, x, cfg: dict, device="cpu"):
        self.x, self.cfg, self.device = as_tensor(x), cfg, torch.device(device)
        self._flat = None

    def loader(self, rows, y, seed: int, weight=None):

        rows = np.asarray(rows, np.int64)
        n, k, n_views, d = self.x.shape
        if is_mil_config(self.cfg["head"]):
            return self._image_loader(rows, y, seed, weight)
        # The rows' patches, flattened and moved to the device once per training run.
        self._flat = self.x[row_tensor(rows)].reshape(len(rows) * k, n_views, d) \
            .to(self.device)
        self._patch_y = torch.from_numpy(np.repeat(np.asarray(y, np.int64), k)).to(self.device)
        g = torch.Generator().manual_seed(int(seed))
        sampler = sampler_for(np.repeat(np.asarray(y, np.int64), k), self.cfg, seed, weight, k)
        if sampler is None:
            sampler = torch.utils.data.RandomSampler(range(len(rows) * k), generator=g)
        return _CachedBatches(len(rows) * k, n_views, int(self.cfg["batch_size"]), sampler, g)

    def _image_loader(self, rows, y, seed: int, weight=None):

        n, k, n_views, d = self.x.shape
        self._images = self.x[row_tensor(rows)].to(self.device)  # rows x K x V x D
        self._image_y = torch.from_numpy(np.asarray(y, np.int64)).to(self.device)
        g = torch.Generator().manual_seed(int(seed))
        sampler = sampler_for(np.asarray(y, np.int64), self.cfg, seed, weight)
        if sampler is None:
            sampler = torch.utils.data.RandomSampler(range(len(rows)), generator=g)
        # batch_size counts patches, as on every path: whole images of K patches each.
        per = max(2, int(self.cfg["batch_size"]) // k)
        return _CachedBatches(len(rows), n_views, per, sampler, g, k=k)

    def prepare_fn(self, trainer):

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
        return self.x[row_tensor(rows)].reshape(-1, self.x.shape[-1])

    def image_probs(self, head, rows, views=("id",), desc: str = "predict"):
        """Image probabilities of ``rows`` per view index or name (``id`` = 0)."""
        idx = [0 if v == "id" else v for v in views]
        probs = image_probs_from_features(head, self.x[row_tensor(rows)], idx,
                                          self.cfg["head"]["pool"])
        return {v: probs[i] for v, i in zip(views, idx)}


def row_tensor(series):
    return torch.from_numpy(np.array(series, dtype=np.int64))  # pandas hands out read-only views


@contextlib.contextmanager
def threads(n: int):
    """Run with ``n`` torch threads (0: leave as is), restoring the count afterwards.

    A small head's matrices are too small to share among threads: on a CPU whose cores are
    also busy elsewhere, two threads were ~10x slower per step than one here.
    """
    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
