"""The model a fold trains: a backbone frozen as the config says, its head, and AdaBN
for random weights."""
from __future__ import annotations

import logging

import numpy as np
from torch import nn

from kit.models.backbones import count_trainable, create_backbone, recalibrate_batchnorm
from kit.models.heads import MILClassifier, PatchClassifier, create_head, is_mil
from kit.task import default_task
from kit.training.checkpoints import weights_digest
from kit.training.finetune import freeze_for_training
from kit.utils import sha256_text

log = logging.getLogger(__name__)


def build_model(backbone: str, cfg: dict, weights="auto", num_classes: int | None = None,
                patch_size: int | None = None, **backbone_kwargs):
    """Backbone (frozen but its norm layers and last ``unfreeze_last`` blocks) + MLP head
    with ``num_classes`` outputs (a task's class count; default: the built-in task's).

    With an ``unfreeze_schedule`` every block it ever opens is trainable, and the model's
    ``thaw_plan`` (:class:`kit.training.finetune.ThawPlan`) tells the training loop which of
    them wait for which epoch; ``thaw_plan`` is None otherwise.

    Returns
    -------
    (PatchClassifier, int)
        The model and its number of trainable parameters (as trained: every scheduled block).
    """
    if num_classes is None:
        num_classes = len(default_task().classes)
    bb = create_backbone(backbone, weights=weights, patch_size=patch_size,
                         phikon_mode=cfg["phikon_mode"], **backbone_kwargs)
    if int(cfg["input_size"]) > 0:
        bb.input_size = int(cfg["input_size"])  # normalize_batch resizes to it on the device
    plan = freeze_for_training(bb, cfg)
    head = create_head(bb.num_features, int(num_classes), **cfg["head"])
    model = MILClassifier(bb, head) if is_mil(head) else PatchClassifier(bb, head)
    model.thaw_plan = plan
    return model, count_trainable(model)


def recalibrate_random(backbone, cfg: dict, array, rows=None, device="cpu",
                       max_patches: int = 4096, data_key: str | None = None) -> int:
    """AdaBN for randomly initialised backbones (``recalibrate_bn: auto``): their BatchNorm
    statistics are re-estimated on the training patches, with a warning that random
    features carry little signal. Returns the patches used (0: nothing done).

    With ``data_key`` (the patch cache's key) the backbone gets a ``state_digest`` naming its
    weights before recalibration and the data (see :func:`kit.training.checkpoints.weights_digest`).
    """
    when = cfg["recalibrate_bn"]  # "auto", true or false (kit.schema)
    random = str(backbone.weights_source).startswith("random")
    if when is False or (when == "auto" and not random):
        return 0
    bs = int(cfg["eval_batch_size"]) or 2 * int(cfg["batch_size"])
    before = None
    if data_key is not None:
        before = weights_digest(backbone)
    used = recalibrate_batchnorm(backbone, array, rows, batch_size=bs, device=device,
                                 max_batches=max(1, max_patches // bs))
    if before is not None and used:
        rows_id = "all" if rows is None else sha256_text(",".join(map(str, np.asarray(rows))))
        backbone.state_digest = sha256_text(
            f"{before}|adabn|{data_key}|{rows_id}|{bs}|{max_patches}")
    if random:
        log.warning(f"{backbone.name}: WARNING: random weights: features of a random frozen "
                    "network carry little signal (BatchNorm statistics recalibrated on "
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
