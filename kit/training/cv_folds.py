"""cv's folds on either training path: train fold ``k`` (on pixels, or a head on cached
embeddings), write its files (``runs/<bb>/fold_<k>/``) and last its ``done.json``."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from kit.config import Layered
from kit.metrics import collapse_reason, get_metric, macro_f1, prob_frame, score, weighted_f1
from kit.models.heads import PatchClassifier, is_mil
from kit.training import fusion, label_issues
from kit.training.build import build_model, recalibrate_random
from kit.training.checkpoints import save_checkpoint
from kit.training.cv_run import FLOAT_FORMAT, CVRun
from kit.training.device import is_oom
from kit.training.feature_cv import features_cv, prepare, train_bag
from kit.training.features import cache_backbone
from kit.training.sources import FeatureSource, PixelSource, attention_weights, row_tensor
from kit.utils import KitError, atomic_write_csv, atomic_write_json

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- one fold
def _full_checkpoint(cfg: dict, weights_source) -> bool:
    """Whether fold checkpoints hold the whole model (``checkpoint`` in train.yaml, one of
    auto, full, trainable as kit.schema checked)."""
    sources = weights_source.values() if isinstance(weights_source, dict) else [weights_source]
    return cfg["checkpoint"] == "full" or (
        cfg["checkpoint"] == "auto" and any(str(s).startswith("random") for s in sources))


def train_pixel_fold(k: int, ctx: CVRun) -> dict:
    """Train fold ``k`` on pixels, write its outputs and finally its ``done.json``.

    With ``label_issues`` on, the fold's training images are first screened by an inner
    cross-validation on them alone; with ``bag`` > 1, several models train (each its own
    seed) and their probabilities are averaged.
    """
    folds, train, test, cfg = ctx.folds, ctx.train, ctx.test, ctx.cfg
    fold_dir = ctx.out / f"fold_{k}"
    (fold_dir / "done.json").unlink(missing_ok=True)  # not done until its outputs are rewritten
    tr, va = folds[folds.fold != k], folds[folds.fold == k]
    seed = ctx.seed + k
    desc = f"{ctx.backbone} fold {k}"
    issues = None
    if cfg["label_issues"]["mode"] != "off":
        issues = label_issues.find_fold_issues(_issue_source(ctx), tr, cfg, seed, k,
                                               desc=f"{desc} ", task=ctx.task)
    source = PixelSource(train.array, cfg, ctx.device)

    def make_model():
        model, n_trainable = build_model(ctx.backbone, cfg, ctx.weights,
                                         num_classes=len(ctx.task.classes),
                                         patch_size=int(train.array.shape[2]))
        recalibrate_random(model.backbone, cfg, train.array, tr.row.values, ctx.device)
        if not ctx.printed:
            log.info(f"{ctx.backbone}: {n_trainable:,} trainable parameters "
                     f"(weights: {model.backbone.weights_source})")
            ctx.printed = True
        return model

    members, oof, tst = train_bag(
        source, make_model, tr, cfg, seed, ctx.device,
        lambda m: source.image_probs(m, va.row.values, ctx.views, desc=f"{desc} oof"),
        lambda m: PixelSource(test.array, cfg, ctx.device).image_probs(
            m, np.arange(len(test.samples)), ctx.views, desc=f"{desc} test"),
        val_rows=va.row.values, val_y=va.y.values, issues=issues, desc=desc,
        metric=ctx.task.metric)
    backbone = members[0].model.backbone
    full = _full_checkpoint(cfg, backbone.weights_source)
    for b, res in enumerate(members):
        _save_member(ctx, k, b, res.model, res, full, {})
    _write_attention(k, ctx, source.attention(members[0].model, va.row.values))
    mark = _write_fold(k, ctx, oof, tst, {
        "weights_source": backbone.weights_source, "trainable_params": members[0].n_trainable,
        **_fit_record(members[0], tr, ctx.task.metric),
        **_bag_record(members, tr, ctx.task.metric),
        **_issues_record(k, ctx, issues), "seed": seed})
    _log_fold(desc, _fit_line(members[0], mark, ctx.task.metric), mark)
    return mark


def _issue_source(ctx: CVRun):
    """Pixel path: the frozen backbone's cached embeddings, on which label_issues' inner
    cross-validation trains heads (seconds, where pixels would take hours); built once."""
    if ctx.issue_source is None:
        log.info(f"{ctx.backbone}: label_issues: inner cross-validation on the frozen backbone's "
                 "cached embeddings")
        _, fcv = _frozen_features(ctx)
        ctx.issue_source = FeatureSource(fcv.x, ctx.cfg, ctx.device)
    return ctx.issue_source


def _fit_record(res, tr: pd.DataFrame, metric: str) -> dict:
    """What ``done.json`` keeps of a fit: the chosen epoch, how it was chosen (with the inner
    split's images), the score that chose it (``val_<metric>``, the task's metric) and the
    history."""
    sel = dict(res.selection)
    pos = sel.pop("stop_positions", None)
    if pos is not None:
        sel["stop_samples"] = tr.sample_index.values[pos].tolist()
    best = res.best_score if res.best_score == res.best_score else None  # NaN: nothing chose
    return {"best_epoch": res.best_epoch, f"val_{metric}": best, "epochs": res.epochs,
            "seconds": round(res.seconds, 1), "history": res.history, "selection": sel}


def _fit_line(res, mark: dict, metric: str) -> str:
    """One line per fold: epochs, how the epoch was chosen, and the fold's OOF score, both
    by ``metric`` (the task's)."""
    mode = res.selection["early_stopping"]
    title = get_metric(metric).title
    if mode == "probe":
        how = (f"inner split chose C={res.selection['chosen_C']:g} ({title} "
               f"{res.best_score:.3f}), refit on all {res.selection['n_fit']} training images")
    elif mode == "none":
        how = f"fixed {res.best_epoch} epochs"
    elif mode == "refit":
        how = (f"inner split chose epoch {res.best_epoch} ({title} {res.best_score:.3f}), "
               f"refit on all {res.selection['n_fit']} training images")
    elif mode == "inner":
        how = f"inner split chose epoch {res.best_epoch} ({title} {res.best_score:.3f})"
    else:
        how = (f"epoch {res.best_epoch} chosen on these OOF images ({title} "
               f"{res.best_score:.3f}, OPTIMISTIC)")
    extra = ""
    if mark.get("bag", 1) > 1:
        extra += f", mean of {mark['bag']} bagged models"
    issues = mark.get("label_issues")
    if issues:
        extra += (f", label_issues {issues['mode']}: {issues['n_flagged']} of "
                  f"{issues['n_train']} training images flagged")
    epochs = "linear probe" if mode == "probe" else f"{res.epochs} epochs"
    return (f"{epochs}, {how}{extra}; OOF {title} {mark['score']:.3f} (TTA), "
            f"{res.seconds:.0f} s")


def _log_fold(desc: str, line: str, mark: dict) -> None:
    """The fold's line, and on the warning channel (kept by ``-q``) a collapsed model."""
    log.info(f"{desc}: {line}")
    if mark.get("collapsed"):
        log.warning(f"{desc}: WARNING: collapsed model: {mark['collapsed']}")


def _write_attention(k: int, ctx: CVRun, weights: np.ndarray | None) -> None:
    """An attention head's weights over each OOF image's patches (``id`` view), for the
    report: ``fold_k/attention.csv`` with ``sample_index,patch,weight``."""
    if weights is None:  # a patch head: no weights, and none left from an earlier run
        (ctx.out / f"fold_{k}" / "attention.csv").unlink(missing_ok=True)
        return
    va = ctx.folds[ctx.folds.fold == k]
    n, n_patches = weights.shape
    frame = pd.DataFrame({"sample_index": np.repeat(va.sample_index.values, n_patches),
                          "patch": np.tile(np.arange(n_patches), n),
                          "weight": weights.reshape(-1)})
    atomic_write_csv(ctx.out / f"fold_{k}" / "attention.csv", frame, FLOAT_FORMAT)


def _write_fold(k: int, ctx: CVRun, oof: dict, tst: dict, record: dict) -> dict:
    """Write fold ``k``'s per-view and TTA-mean image probabilities, then ``done.json`` (last).

    ``oof``/``tst`` map each view to ``n x C`` probabilities of the fold's validation images
    (folds-file order) and of the test images; ``record`` is how the fold was trained. Both
    training paths end here, so their fold files cannot differ in format.
    """
    folds, test, task = ctx.folds, ctx.test, ctx.task
    classes = task.classes
    fold_dir = ctx.out / f"fold_{k}"
    tr, va = folds[folds.fold != k], folds[folds.fold == k]
    front = {"fold": k, "label": va.label.values}
    for v in ctx.views:
        atomic_write_csv(fold_dir / "tta" / f"oof_{v}.csv",
                         prob_frame(va.sample_index, oof[v], classes=classes, **front),
                         FLOAT_FORMAT)
        atomic_write_csv(fold_dir / "tta" / f"test_{v}.csv",
                         prob_frame(test.samples.sample_index, tst[v], classes=classes),
                         FLOAT_FORMAT)
    oof_mean = np.mean([oof[v] for v in ctx.views], axis=0)
    test_mean = np.mean([tst[v] for v in ctx.views], axis=0)
    atomic_write_csv(fold_dir / "oof.csv",
                     prob_frame(va.sample_index, oof_mean, classes=classes, **front),
                     FLOAT_FORMAT)
    atomic_write_csv(fold_dir / "test.csv",
                     prob_frame(test.samples.sample_index, test_mean, classes=classes),
                     FLOAT_FORMAT)
    mark = {
        "fold": k, "config_hash": ctx.hash, "folds_sha256": ctx.folds_sha,
        "patch_keys": ctx.keys, "backbone": ctx.backbone,
        "training_path": ctx.training_path, "views": list(ctx.views), **record,
        "macro_f1": macro_f1(va.y.values, oof_mean),
        "weighted_f1": weighted_f1(va.y.values, oof_mean),
        "metric": task.metric, "score": score(task.metric, va.y.values, oof_mean, classes),
        "collapsed": collapse_reason(va.y.values, oof_mean, classes=classes,
                                     metric=task.metric),
        "train_samples": tr.sample_index.tolist(), "val_samples": va.sample_index.tolist(),
        "device": str(ctx.device),
    }
    atomic_write_json(fold_dir / "done.json", mark)
    return mark


# --------------------------------------------------------------------------- feature cache
def train_feature_folds(pending: list[int], ctx: CVRun) -> dict[int, dict]:
    """Folds ``pending`` with the head trained on cached embeddings
    (:func:`kit.training.feature_cv.features_cv`), written exactly like pixel-trained folds
    (model.pt included)."""
    cfg, out = ctx.cfg, ctx.out
    for k in pending:  # not done until their outputs are rewritten
        (out / f"fold_{k}" / "done.json").unlink(missing_ok=True)
    bb, fcv = fusion.features(ctx) if ctx.fused else _frozen_features(ctx)
    full = _full_checkpoint(cfg, bb.weights_source)
    info = {"views": list(fcv.train.views), "train_dir": str(fcv.train.path),
            "train_key": fcv.train.key, "test_dir": str(fcv.test.path),
            "test_key": fcv.test.key, "weights_sha256": fcv.train.meta.get("weights_sha256"),
            "dtype": fcv.train.meta.get("dtype")}
    marks = {}

    def write(k: int, pred) -> None:
        va = ctx.folds[ctx.folds.fold == k]
        if list(pred.sample_index) != list(va.sample_index):
            raise KitError(f"{fcv.train.path}: fold {k} rows do not match {ctx.paths.folds_csv}"
                           "; rerun with --restart")  # cannot happen: both read load_folds
        fit, desc = pred.fit, f"{ctx.backbone} fold {k}"
        n_trainable = sum(p.numel() for p in fit.head.parameters())
        if not ctx.printed:
            log.info(f"{ctx.backbone}: {n_trainable:,} trainable parameters, the head only "
                     f"(weights: {bb.weights_source})")
            ctx.printed = True
        tr = ctx.folds[ctx.folds.fold != k]
        record = _fit_record(fit, tr, ctx.task.metric)
        # With bagging, member 0's attention (every member's would differ in scale only).
        _write_attention(k, ctx, attention_weights(fit.head, fcv.x[
            row_tensor(va.row)]) if is_mil(fit.head) else None)
        for b, member in enumerate(pred.members or [fit]):
            _save_member(ctx, k, b, PatchClassifier(bb, member.head), member, full,
                         {"training_path": "feature_cache"})
        marks[k] = _write_fold(k, ctx, pred.per_view, pred.test_per_view, {
            "weights_source": bb.weights_source, "trainable_params": n_trainable,
            **record, **_bag_record(pred.members or [fit], tr, ctx.task.metric),
            **_issues_record(k, ctx, pred.issues), "seed": ctx.seed + k,
            "feature_cache": info})
        _log_fold(desc, f"{_fit_line(fit, marks[k], ctx.task.metric)} (head on cached "
                  "embeddings)", marks[k])

    features_cv(fcv, ctx.paths, folds=pending, on_fold=write)
    return marks


def _frozen_features(ctx: CVRun):
    """The run's backbone frozen whole and its embedding cache (a :class:`kit.training.
    features.FeatureCV`): the feature-cache path's inputs, and the inner models' of
    label_issues on the pixel path."""
    cfg = ctx.cfg
    bb = cache_backbone(ctx.backbone, cfg, ctx.train, ctx.weights, ctx.seed, ctx.device)
    try:
        fcv = prepare(bb, ctx.paths, settings=Layered(cfg), seed=ctx.seed, device=ctx.device,
                      task=ctx.task)
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not is_oom(exc):
            raise
        size = int(cfg["features"]["batch_size"])
        raise KitError(f"out of memory while embedding patches for the feature cache, {size} "
                       f"patches a batch on {ctx.device}; lower it, e.g. --set "
                       f"features.batch_size={max(1, size // 2)} (finished folds are kept)"
                       ) from exc
    return bb, fcv


def _save_member(ctx: CVRun, k: int, b: int, model, res, full: bool, meta: dict) -> None:
    """Bag member ``b`` of fold ``k``: ``model.pt`` for the first, ``model_bag<b>.pt`` after."""
    name = "model.pt" if b == 0 else f"model_bag{b}.pt"
    sel = {key: v for key, v in res.selection.items() if key != "stop_positions"}
    save_checkpoint(model, ctx.out / f"fold_{k}" / name, full,
                    {"backbone": ctx.backbone, "fold": k, "config_hash": ctx.hash,
                     "bag_member": b, "best_epoch": res.best_epoch,
                     f"best_{ctx.task.metric}": res.best_score, "selection": sel, **meta})
    if b == 0:  # members of an earlier, larger bag are not this run's
        n = int(ctx.cfg["bag"])
        for old in (ctx.out / f"fold_{k}").glob("model_bag*.pt"):
            member = old.stem[len("model_bag"):]
            if not member.isdigit() or int(member) >= n:
                old.unlink()


def _bag_record(members: list, tr: pd.DataFrame, metric: str) -> dict:
    """What ``done.json`` keeps of the bag: each member's chosen epoch and score."""
    if len(members) < 2:
        return {"bag": 1}
    return {"bag": len(members),
            "bag_members": [{"best_epoch": m.best_epoch,
                             f"val_{metric}": m.best_score if m.best_score == m.best_score
                             else None, "seconds": round(m.seconds, 1)} for m in members]}


def _issues_record(k: int, ctx: CVRun, issues) -> dict:
    """Write ``fold_k/label_issues.csv`` (every training image's inner-CV verdict) and return
    the summary ``done.json`` keeps; removes a stale file when label issues are off."""
    path = ctx.out / f"fold_{k}" / label_issues.FILE
    if issues is None:
        path.unlink(missing_ok=True)
        return {}
    atomic_write_csv(path, issues.frame(), FLOAT_FORMAT)
    mode = ctx.cfg["label_issues"]["mode"]
    keep, _ = label_issues.training_weights(issues, ctx.cfg)
    return {"label_issues": {"mode": mode, "model": ctx.cfg["label_issues"]["model"],
                             "n_train": int(len(issues.y)),
                             "n_flagged": int(issues.flagged.sum()),
                             "n_trained_on": int(keep.sum()) if keep is not None
                             else int(len(issues.y))}}
