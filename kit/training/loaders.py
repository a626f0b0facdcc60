"""Training batches on the pixel path: datasets over the patch cache, seeded loaders and
the weighted samplers (class balance, sample weights)."""
from __future__ import annotations

import numpy as np
import torch

from kit.training.device import n_workers


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
