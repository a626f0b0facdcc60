"""A head trained on given embeddings by the kit's one loop: what the tests of heads, the
probe and early stopping train (cv and tune reach the same loop through
:class:`kit.training.feature_cv.FeatureCV`)."""
from __future__ import annotations

import numpy as np
import torch

from kit import CLASSES
from kit.models.heads import create_head
from kit.training.sources import FeatureSource, as_tensor
from kit.training.train import fit
from kit.utils import KitError, seed_everything


def fit_head(x_train, y_train, x_val, y_val, cfg: dict, seed: int = 42,
            device="cpu", num_classes: int = len(CLASSES),
            desc: str = "head", groups=None):
    """Train a head (``cfg["head"]``) on cached embeddings with :func:`kit.training.train.fit`.

    Parameters
    ----------
    x_train, x_val : array or tensor, ``n x K x V x D``
        Embeddings per image, patch and view; view 0 is ``id``
        (:func:`kit.training.features.cache_views`).
        ``x_val`` chooses the epoch only with ``early_stopping: oof``.
    y_train, y_val : int arrays
        Class index per image (every patch carries its image's label).
    cfg : dict
        Resolved training config (:func:`kit.training.settings.train_config`).
    seed : int
        Seeds the head's initialisation, the patch order, the view draws and the inner split.

    Returns
    -------
    kit.training.selection.FoldResult
        ``.head`` (= ``.model``) holds the chosen epoch's weights.
    """
    x_train, x_val = as_tensor(x_train), as_tensor(x_val)
    y_train, y_val = np.asarray(y_train, np.int64), np.asarray(y_val, np.int64)
    if len(y_train) == 0:
        raise KitError(f"{desc}: no training images")
    seed_everything(seed)
    head = create_head(x_train.shape[-1], num_classes, **cfg["head"])
    source = FeatureSource(torch.cat([x_train, x_val]), cfg, device)
    n = len(y_train)
    return fit(head, source, np.arange(n), y_train, cfg, val_rows=np.arange(n, n + len(y_val)),
               val_y=y_val, groups=groups, seed=seed, device=device, desc=desc)
