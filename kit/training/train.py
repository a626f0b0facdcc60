"""The kit's one training loop, :func:`fit`: optimiser, schedule, precision, CutMix and
loss (:class:`Trainer`) over a data source, with the epoch chosen as the config says."""
from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn

from kit.metrics import get_metric
from kit.models.backbones import count_trainable
from kit.models.heads import is_probe, standardizer
from kit.models.normalize import normalize_batch
from kit.training.build import set_train_mode
from kit.training.checkpoints import checkpoint_keys, save_checkpoint, snapshot
from kit.training.device import amp_dtype, auto_flag, autocast, oom_as_kit_error
from kit.training.finetune import param_groups, parse_schedule
from kit.training.losses import one_hot, soft_cross_entropy, warmup_cosine
from kit.training.predict import n_outputs
from kit.training.probe import fit_probe
from kit.training.selection import FoldResult, early_stopping_mode, inner_split, is_honest
from kit.training.sources import PixelSource
from kit.utils import KitError, progress, seed_everything


class Trainer:
    """The optimisation side of training: optimiser, schedule, precision, CutMix and loss.

    ``epoch(batches, prepare)`` runs one pass of the kit's loop (raw batch -> ``prepare`` ->
    forward, backward, step); ``prepare`` turns a batch of the data source into the model's
    input and soft target (pixels: to the device, normalise, mix; cached embeddings: pick the
    vectors). ``step(x, target)`` is the bare forward/backward/step on a ready batch, which
    the training benchmark compares the loop with.

    The optimiser's parameter groups follow ``lr_decay``
    (:func:`kit.training.finetune.param_groups`); with an ``unfreeze_schedule`` the model's
    ``thaw_plan`` opens blocks as epochs pass (``begin_epoch``), and ``keys`` names the state
    a snapshot must hold (every scheduled block, open or not yet).
    """
    def __init__(self, model: nn.Module, cfg: dict, device: torch.device, train_y,
                 steps_per_epoch: int):
        from kit.training.augment import class_weights, create_mixer

        self.model, self.cfg, self.device = model, cfg, torch.device(device)
        self.n_classes = n_outputs(model)
        self.smoothing = float(cfg["label_smoothing"])
        self.mixer = create_mixer(cfg["augment"]["cutmix_alpha"], self.n_classes, self.smoothing)
        self.weight = None
        if cfg["class_balance"] == "loss":
            self.weight = torch.as_tensor(class_weights(np.asarray(train_y, np.int64),
                                                        self.n_classes),
                                          dtype=torch.float32, device=self.device)
        model.to(self.device)
        self.channels_last = auto_flag(cfg["channels_last"], self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.dtype = amp_dtype(self.device, cfg["amp"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.thaw = getattr(model, "thaw_plan", None)
        if not hasattr(model, "thaw_plan") and hasattr(model, "backbone") \
                and parse_schedule(cfg["unfreeze_schedule"]) is not None:
            raise KitError("train: unfreeze_schedule needs a model built by "
                           "kit.training.build.build_model (it plans the thawing)")
        if self.thaw is not None:
            self.thaw.open_all(model.backbone)  # every group in the optimiser from the start
        self.keys = checkpoint_keys(model, full=False)
        groups = param_groups(model, cfg)
        if not any(g["params"] for g in groups):
            raise KitError("train: the model has no trainable parameters")
        # fused: one kernel per step instead of a dozen per tensor (a third of a small head's
        # step on a CPU)
        self.opt = torch.optim.AdamW(groups, lr=float(cfg["lr"]),
                                     weight_decay=float(cfg["weight_decay"]),
                                     fused=self.device.type in ("cpu", "cuda"))
        steps = max(1, int(steps_per_epoch))
        total = int(cfg["epochs"]) * steps
        warmup = int(round(float(cfg["warmup_epochs"]) * steps))
        min_ratio = float(cfg["min_lr_ratio"])
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: warmup_cosine(s, total, warmup, min_ratio))

    def begin_epoch(self, done: int) -> int | None:
        """Before the epoch that follows ``done`` finished ones: freeze the scheduled blocks
        still waiting, open the others. Returns the open blocks (None: no schedule)."""
        if self.thaw is None:
            return None
        return self.thaw.apply(self.model.backbone, done)

    def end_training(self) -> None:
        """Every scheduled block trainable again: the model as trained, for checkpoints,
        snapshots and a refit's new Trainer."""
        if self.thaw is not None:
            self.thaw.open_all(self.model.backbone)

    def prepare(self, xb: torch.Tensor, yb: torch.Tensor, mix: bool = True):
        """uint8 ``B x P x P x 3`` batch and labels -> normalised (mixed) input and soft target."""

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
        with autocast(self.device, self.dtype):
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


def fit(model: nn.Module, source, train_rows, train_y, cfg: dict, *, val_rows=None, val_y=None,
        groups=None, seed: int = 42, device: torch.device | str = "cpu",
        desc: str = "train", sample_weight=None, metric: str = "macro_f1") -> FoldResult:
    """The kit's one training loop: train ``model`` on ``train_rows`` of ``source``.

    A head that standardises its inputs (:class:`kit.models.heads.Standardize`) gets its
    statistics from the features of all ``train_rows`` first (no labels). How the epoch is
    chosen follows ``cfg["early_stopping"]`` (:data:`EARLY_STOPPING`): ``inner`` stops early
    on an inner split of ``train_rows`` (:func:`inner_split`, from ``groups`` and ``seed``)
    and keeps its best epoch; ``refit`` then retrains from the same
    initial weights on all of ``train_rows`` for that many epochs; ``none`` trains
    ``cfg["epochs"]`` and keeps the last; ``oof`` stops early on ``val_rows`` (optimistic
    when those rows are then scored). Only ``oof`` reads ``val_rows``/``val_y``. Epochs
    are compared by ``metric`` on the rows that stop.

    Parameters
    ----------
    model : nn.Module
        Frozen as it should be; parameters with ``requires_grad`` are optimised.
    source : PixelSource or kit.training.sources.FeatureSource
        ``loader(rows, y, seed)``, ``prepare_fn(trainer)``, ``image_probs(model, rows, views)``.
    train_rows, train_y : int arrays
        Rows of the source and their class indices.
    seed : int
        Seeds torch, numpy, the sampler, the augmentation and the inner split.
    sample_weight : array, optional
        Per training image: the sampler draws images in proportion to it.
    groups : array, optional
        Group of each training image (a patient, shared masks): the inner split keeps each
        group on one side.
    metric : str
        A name of :data:`kit.metrics.METRICS`, the task's: what chooses the epoch (or the
        probe's ``C``); each history record keeps it as ``val_<metric>``.

    A closed-form head (``head.type: logreg``) is fitted by :func:`kit.training.probe.fit_probe`
    instead of this loop.

    Returns
    -------
    FoldResult
    """
    if is_probe(model):
        return fit_probe(getattr(model, "head", model), source, train_rows, train_y, cfg,
                         groups=groups, seed=seed, desc=desc, sample_weight=sample_weight,
                         metric=metric)

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
        n_splits = int(cfg["inner_folds"])
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
    initial = snapshot(model) if mode == "refit" else None
    run = _train(model, source, train_rows[fit_pos], train_y[fit_pos], cfg, stop_rows, stop_y,
                 int(cfg["epochs"]), seed, device, desc,
                 None if weight is None else weight[fit_pos], metric)
    history = run["history"]
    if mode == "refit":
        # The inner run chose the epoch count; the same initial weights and seed train on all
        # the fold's images for that many epochs (same schedule, so epoch E means the same).
        model.load_state_dict(initial, strict=False)
        seed_everything(seed)
        refit = _train(model, source, train_rows, train_y, cfg, None, None, run["epoch"], seed,
                       device, f"{desc} refit", weight, metric)
        history = history + [{**h, "refit": True} for h in refit["history"]]
    plan = getattr(model, "thaw_plan", None)
    if plan is not None:
        selection["unfreeze_stages"] = [list(stage) for stage in plan.stages]
    selection.update(chosen_epoch=run["epoch"], stop_score=run["score"],
                     n_fit=int(len(fit_pos) if mode != "refit" else len(train_rows)),
                     n_stop=int(0 if stop_rows is None else len(stop_rows)))
    model.eval()
    return FoldResult(model=model, best_epoch=run["epoch"], best_score=run["score"],
                      epochs=len(history), seconds=time.perf_counter() - t0, history=history,
                      val_probs=run["probs"], n_trainable=count_trainable(model),
                      selection=selection)


def _train(model, source, rows, y, cfg, stop_rows, stop_y, epochs: int, seed: int, device,
           desc: str, weight=None, metric: str = "macro_f1") -> dict:
    """Train up to ``epochs`` epochs; with stop rows, keep the best epoch by their ``metric``
    (patience from ``cfg``), else the last. The schedule always spans ``cfg["epochs"]``."""
    loader = source.loader(rows, y, seed) if weight is None else \
        source.loader(rows, y, seed, weight=weight)
    trainer = Trainer(model, cfg, device, y, len(loader))
    prepare = source.prepare_fn(trainer)
    patience = int(cfg["patience"])
    n_classes = trainer.n_classes
    scorer, key = get_metric(metric).batch, f"val_{metric}"
    best = {"score": float("nan"), "epoch": 0, "state": None, "probs": None}
    history = []
    try:
        for epoch in range(1, int(epochs) + 1):
            open_blocks = trainer.begin_epoch(epoch - 1)
            loss = trainer.epoch(loader, desc=f"{desc} epoch {epoch}/{epochs}", prepare=prepare)
            record = {"epoch": epoch, "loss": loss, "lr": trainer.opt.param_groups[0]["lr"]}
            if open_blocks is not None:
                record["blocks_open"] = open_blocks
            history.append(record)
            if stop_rows is None:
                best.update(epoch=epoch)
                continue
            img = source.image_probs(model, stop_rows, ("id",), desc=f"{desc} stop")["id"]
            score = float(scorer(img.argmax(1)[None], stop_y, n_classes)[0])
            record[key] = score
            if best["state"] is None or score > best["score"]:
                best.update(score=score, epoch=epoch, probs=img,
                            state=snapshot(model, trainer.keys))
            elif patience and epoch - best["epoch"] >= patience:
                break
    finally:
        trainer.end_training()
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
