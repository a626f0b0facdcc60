"""Cross-validated training of one backbone: ``runs/<bb>/oof.csv``, ``test.csv`` and friends.

Fold ``k`` trains on the other folds' images and validates on its own; its outputs go to
``runs/<bb>/fold_k/`` (``model.pt``, ``oof.csv``, ``test.csv``, ``tta/``) and ``done.json``
is written last, as the commit mark. A rerun skips every fold whose ``done.json`` matches
the folds file and the run's config, so a killed run resumes at the fold it was on and
``--fold K`` jobs on separate machines can share one ``runs/<bb>/``. Once every fold is done
with the same config, the fold outputs are assembled into the backbone's files (see
docs/DESIGN.md); ``metrics.json`` is written last.

Two training paths write the same files. ``pixels`` trains the model on augmented patches.
``feature_cache`` runs when the config trains nothing in the backbone (norm layers frozen
too, no unfrozen block): every patch and test-time view is embedded once by the frozen
backbone (:mod:`kit.training.features`) and each fold trains only its head on the cached vectors,
seconds instead of hours. A frozen backbone computes the same embeddings every epoch, so
what is lost is the pixel augmentation: colour jitter and CutMix have no equivalent on
cached vectors (flips become a random cached view). That path says so when it starts and
records it in ``metrics.json`` (``training_path``, ``feature_cache.not_applied``);
``feature_cache=False`` (``--no-feature-cache``) trains on pixels with them.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kit import CLASSES, PROB_COLUMNS
from kit.config import Layered
from kit.data.folds import load_folds
from kit.data.patches import patches_for
from kit.metrics import (bootstrap_ci, classification_summary, collapse_reason, format_ci,
                         macro_f1, plot_confusion, prob_frame, weighted_f1)
from kit.models.backbones import native_size
from kit.models.heads import PatchClassifier, is_mil, is_mil_config
from kit.paths import Paths
from kit.training import fusion, label_issues
from kit.training.build import build_model, recalibrate_random
from kit.training.checkpoints import save_checkpoint
from kit.training.device import is_oom, pick_device
from kit.training.features import cache_backbone, cache_views
from kit.training.fold import features_cv, prepare, train_bag
from kit.training.params import resolve
from kit.training.selection import early_stopping_mode, is_honest
from kit.training.settings import (pixel_augment_not_applied, train_config, training_path,
                                   tta_views)
from kit.training.sources import FeatureSource, PixelSource, attention_weights, row_tensor
from kit.utils import (KitError, atomic_write_csv, atomic_write_json, package_versions,
                       sha256_file, sha256_text, write_config)

log = logging.getLogger(__name__)

FLOAT_FORMAT = "%.7g"
# Config keys that change speed, not results: they do not invalidate finished folds.
# The embedding cache's settings (``features``) are left out too: what changes the vectors (the
# dtype, autocast) is in the cache key, and the dtype enters the hash on its own.
# ``patches_size`` only chooses the cache, whose keys enter the hash themselves.
_NOT_HASHED = ("num_workers", "eval_batch_size", "features", "patches_size")
_ASSEMBLED = ("oof.csv", "test.csv", "metrics.json", "confusion.png", "config.yaml",
              "attention.csv", "label_issues.csv")


# --------------------------------------------------------------------------- one run
@dataclass
class CVRun:
    """Everything the fold trainers and the assembly share about one ``cv`` run."""

    paths: Paths
    backbone: str
    weights: object  # "auto" | "random" | a path
    seed: int
    cfg: dict  # resolved train.yaml (+ augment)
    views: tuple  # test-time views
    folds: pd.DataFrame  # folds.csv + row (patch cache row) + y (class index)
    folds_sha: str
    train: object  # kit.data.patches.PatchSet
    test: object
    out: Path  # runs/<backbone>/
    keys: dict  # patch cache keys
    n_folds: int
    device: object  # torch.device
    params_desc: str
    params_source: dict | None
    training_path: str  # pixels | feature_cache
    hash: str  # config_hash: what a fold's outputs depend on
    printed: bool = False  # the trainable-parameter line, once per run
    issue_source: object = None  # pixel path: the frozen embeddings label_issues trains on
    fused: object = None  # a run named a+b: its parts (kit.training.fusion.Fusion)


# --------------------------------------------------------------------------- params
def resolve_params(spec, paths: Paths, backbone: str, cfg: Layered | None = None,
                   feature_cache: bool = True, with_source: bool = False):
    """Dotted-key overrides from ``--params``: ``tuned``, ``best``, ``none``, a file or a dict.

    ``tuned`` uses ``runs/tune/<bb>/best.yaml`` when it exists, else nothing; ``best``
    requires it. Keys tuned for another training path than the one cv takes with ``cfg``
    (command-line overrides) over them are dropped, with a printed note
    (:mod:`kit.training.params`). Returns ``(params, description)``, and with ``with_source`` also
    the ``params_source`` record of metrics.json (how the params were chosen).
    """
    sha = None
    if paths.folds_csv.exists():
        sha = sha256_file(paths.folds_csv)
    found = resolve(spec, paths, backbone, cfg, feature_cache, sha)
    for note in found.notes:
        log.info(f"{backbone}: {note}")
    if with_source:
        return found.params, found.description, found.source
    return found.params, found.description


# --------------------------------------------------------------------------- inputs
def _inputs(paths: Paths, backbone: str, cfg: dict):
    """Folds, their hash and both patch caches (of the size ``backbone`` trains on), checked
    against each other."""

    folds, folds_sha = load_folds(paths)
    # A fused run reads one cache for all its parts: their native size when they share one.
    natives = {native_size(part) for part in fusion.split_name(backbone)}
    native = natives.pop() if len(natives) == 1 else None
    train, test = patches_for(paths, native, cfg["patches_size"], backbone=backbone)
    rows = pd.Series(np.arange(len(train.samples)), index=train.samples.sample_index.values)
    missing = sorted(set(folds.sample_index) - set(rows.index))
    extra = sorted(set(rows.index) - set(folds.sample_index))
    if missing or extra:
        raise KitError(
            f"{paths.folds_csv} and the patch cache {train.folder} list different "
            f"images ({len(missing)} only in folds, {len(extra)} only in patches, e.g. "
            f"{(missing or extra)[0]}); rerun ./run.sh patches and ./run.sh folds --force")
    folds = folds.assign(row=rows.loc[folds.sample_index].values)
    cached = train.samples.label.values[folds.row.values]
    bad = folds.sample_index[cached != folds.label.values].tolist()
    if bad:
        raise KitError(f"{paths.folds_csv}: labels differ from the patch cache for {len(bad)} "
                       f"images (e.g. {bad[0]}); rerun ./run.sh patches and ./run.sh folds --force")
    if train.array.shape[2:] != test.array.shape[2:] or train.array.shape[1] != test.array.shape[1]:
        raise KitError(f"train and test patch caches differ in shape ({train.array.shape[1:]} vs "
                       f"{test.array.shape[1:]}); rerun ./run.sh patches")
    folds["y"] = [CLASSES.index(c) for c in folds.label]
    return folds, folds_sha, train, test


def config_hash(backbone: str, weights, seed: int, cfg: dict, keys: dict,
                path: str = "pixels", features_dtype: str | None = None,
                device_type: str = "cpu", fused: dict | None = None) -> str:
    """What a fold's outputs depend on, hashed (speed-only settings left out).

    ``path`` (and the cache's ``features_dtype``) enter only for the feature-cache path, so
    that its folds are never taken for pixel-trained ones. The device type enters because
    CPU and GPU kernels give different probabilities: folds trained on both are never
    assembled together. ``fused`` (a fused run's parts: weights digests, cache keys) enters
    when given.
    """
    hashed = {k: v for k, v in cfg.items() if k not in _NOT_HASHED}
    payload = {"backbone": backbone, "weights": str(weights), "seed": int(seed), "cfg": hashed,
               "patches": keys, "device_type": str(device_type)}
    if path != "pixels":
        payload.update(path=path, features_dtype=features_dtype)
    payload.update({"fused": fused} if fused else {})  # single runs keep their hashes
    return sha256_text(json.dumps(payload, sort_keys=True, default=str))


def _read_done(fold_dir: Path) -> dict | None:
    try:
        return json.loads((fold_dir / "done.json").read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # a damaged commit mark: the fold is simply not done


def _check_folds_unchanged(out: Path, folds_sha: str, n_folds: int) -> dict[int, dict]:
    """Done marks of the existing folds; KitError if any was made with another folds file."""
    done = {}
    for k in range(n_folds):
        mark = _read_done(out / f"fold_{k}")
        if mark is not None:
            done[k] = mark
    stale = sorted(k for k, m in done.items() if m.get("folds_sha256") != folds_sha)
    others = sorted(p.name for p in out.glob("fold_*") if p.is_dir()
                    and p.name not in {f"fold_{k}" for k in range(n_folds)}
                    and _read_done(p) is not None)
    if stale or others:
        names = [f"fold_{k}" for k in stale] + others
        raise KitError(f"{out}: {', '.join(names)} were trained with a different folds file "
                       f"than {folds_sha[:12]}... (folds/folds.csv changed since); refusing to "
                       f"mix them: delete {out} or rerun with --restart")
    return done


def _restart(out: Path, fold: int | None) -> None:
    """Remove what a restart retrains: one fold (and the assembled files) or everything."""
    targets = [out / f"fold_{fold}"] if fold is not None else list(out.glob("fold_*"))
    targets += [out / name for name in _ASSEMBLED] + [out / "tta"]
    for path in targets:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# --------------------------------------------------------------------------- one fold
def _full_checkpoint(cfg: dict, weights_source) -> bool:
    """Whether fold checkpoints hold the whole model (``checkpoint`` in train.yaml)."""
    if cfg["checkpoint"] not in ("auto", "full", "trainable"):
        raise KitError(f"train: checkpoint must be auto, full or trainable "
                       f"(got {cfg['checkpoint']!r})")
    sources = weights_source.values() if isinstance(weights_source, dict) else [weights_source]
    return cfg["checkpoint"] == "full" or (
        cfg["checkpoint"] == "auto" and any(str(s).startswith("random") for s in sources))


def _train_fold(k: int, ctx: CVRun) -> dict:
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
                                               desc=f"{desc} ")
    source = PixelSource(train.array, cfg, ctx.device)

    def make_model():
        model, n_trainable = build_model(ctx.backbone, cfg, ctx.weights,
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
        val_rows=va.row.values, val_y=va.y.values, issues=issues, desc=desc)
    backbone = members[0].model.backbone
    full = _full_checkpoint(cfg, backbone.weights_source)
    for b, res in enumerate(members):
        _save_member(ctx, k, b, res.model, res, full, {})
    _write_attention(k, ctx, source.attention(members[0].model, va.row.values))
    mark = _write_fold(k, ctx, oof, tst, {
        "weights_source": backbone.weights_source, "trainable_params": members[0].n_trainable,
        **_fit_record(members[0], tr), **_bag_record(members, tr),
        **_issues_record(k, ctx, issues), "seed": seed})
    log.info(f"{desc}: {_fit_line(members[0], mark)}")
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


def _fit_record(res, tr: pd.DataFrame) -> dict:
    """What ``done.json`` keeps of a fit: the chosen epoch, how it was chosen (with the inner
    split's images), the score that chose it and the history."""
    sel = dict(res.selection)
    pos = sel.pop("stop_positions", None)
    if pos is not None:
        sel["stop_samples"] = tr.sample_index.values[pos].tolist()
    score = res.best_score if res.best_score == res.best_score else None  # NaN: nothing chose
    return {"best_epoch": res.best_epoch, "val_macro_f1": score, "epochs": res.epochs,
            "seconds": round(res.seconds, 1), "history": res.history, "selection": sel}


def _fit_line(res, mark: dict) -> str:
    """One line per fold: epochs, how the epoch was chosen, and the fold's OOF score."""
    mode = res.selection["early_stopping"]
    if mode == "probe":
        how = (f"inner split chose C={res.selection['chosen_C']:g} (macro F1 "
               f"{res.best_score:.3f}), refit on all {res.selection['n_fit']} training images")
    elif mode == "none":
        how = f"fixed {res.best_epoch} epochs"
    elif mode == "refit":
        how = (f"inner split chose epoch {res.best_epoch} (macro F1 {res.best_score:.3f}), "
               f"refit on all {res.selection['n_fit']} training images")
    elif mode == "inner":
        how = f"inner split chose epoch {res.best_epoch} (macro F1 {res.best_score:.3f})"
    else:
        how = (f"epoch {res.best_epoch} chosen on these OOF images (macro F1 "
               f"{res.best_score:.3f}, OPTIMISTIC)")
    warn = f"\n  WARNING: collapsed model: {mark['collapsed']}" if mark.get("collapsed") else ""
    extra = ""
    if mark.get("bag", 1) > 1:
        extra += f", mean of {mark['bag']} bagged models"
    issues = mark.get("label_issues")
    if issues:
        extra += (f", label_issues {issues['mode']}: {issues['n_flagged']} of "
                  f"{issues['n_train']} training images flagged")
    epochs = "linear probe" if mode == "probe" else f"{res.epochs} epochs"
    return (f"{epochs}, {how}{extra}; OOF macro F1 {mark['macro_f1']:.3f} (TTA), "
            f"{res.seconds:.0f} s{warn}")


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
    folds, test = ctx.folds, ctx.test
    fold_dir = ctx.out / f"fold_{k}"
    tr, va = folds[folds.fold != k], folds[folds.fold == k]
    front = {"fold": k, "label": va.label.values}
    for v in ctx.views:
        atomic_write_csv(fold_dir / "tta" / f"oof_{v}.csv",
                         prob_frame(va.sample_index, oof[v], **front), FLOAT_FORMAT)
        atomic_write_csv(fold_dir / "tta" / f"test_{v}.csv",
                         prob_frame(test.samples.sample_index, tst[v]), FLOAT_FORMAT)
    oof_mean = np.mean([oof[v] for v in ctx.views], axis=0)
    test_mean = np.mean([tst[v] for v in ctx.views], axis=0)
    atomic_write_csv(fold_dir / "oof.csv", prob_frame(va.sample_index, oof_mean, **front),
                     FLOAT_FORMAT)
    atomic_write_csv(fold_dir / "test.csv", prob_frame(test.samples.sample_index, test_mean),
                     FLOAT_FORMAT)
    mark = {
        "fold": k, "config_hash": ctx.hash, "folds_sha256": ctx.folds_sha,
        "patch_keys": ctx.keys, "backbone": ctx.backbone,
        "training_path": ctx.training_path, "views": list(ctx.views), **record,
        "macro_f1": macro_f1(va.y.values, oof_mean),
        "weighted_f1": weighted_f1(va.y.values, oof_mean),
        "collapsed": collapse_reason(va.y.values, oof_mean),
        "train_samples": tr.sample_index.tolist(), "val_samples": va.sample_index.tolist(),
        "device": str(ctx.device),
    }
    atomic_write_json(fold_dir / "done.json", mark)
    return mark


# --------------------------------------------------------------------------- feature cache
def _feature_folds(pending: list[int], ctx: CVRun) -> dict[int, dict]:
    """Folds ``pending`` with the head trained on cached embeddings (:func:`kit.training.fold.features_cv`), written exactly like pixel-trained folds (model.pt included)."""
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
        record = _fit_record(fit, tr)
        # With bagging, member 0's attention (every member's would differ in scale only).
        _write_attention(k, ctx, attention_weights(fit.head, fcv.x[
            row_tensor(va.row)]) if is_mil(fit.head) else None)
        for b, member in enumerate(pred.members or [fit]):
            _save_member(ctx, k, b, PatchClassifier(bb, member.head), member, full,
                         {"training_path": "feature_cache"})
        marks[k] = _write_fold(k, ctx, pred.per_view, pred.test_per_view, {
            "weights_source": bb.weights_source, "trainable_params": n_trainable,
            **record, **_bag_record(pred.members or [fit], tr),
            **_issues_record(k, ctx, pred.issues), "seed": ctx.seed + k,
            "feature_cache": info})
        log.info(f"{desc}: {_fit_line(fit, marks[k])} (head on cached embeddings)")

    features_cv(fcv, ctx.paths, folds=pending, on_fold=write)
    return marks


def _frozen_features(ctx: CVRun):
    """The run's backbone frozen whole and its embedding cache (a :class:`kit.training.
    features.FeatureCV`): the feature-cache path's inputs, and the inner models' of
    label_issues on the pixel path."""
    cfg = ctx.cfg
    bb = cache_backbone(ctx.backbone, cfg, ctx.train, ctx.weights, ctx.seed, ctx.device)
    try:
        fcv = prepare(bb, ctx.paths, cfg=Layered(cfg), seed=ctx.seed, device=ctx.device)
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not is_oom(exc):
            raise
        size = int(cfg["features"]["batch_size"])
        raise KitError(f"out of memory while embedding patches for the feature cache, {size} "
                       f"patches a batch on {ctx.device}; lower it, e.g. --set "
                       f"features.batch_size={max(1, size // 2)} (finished folds are kept)")
    return bb, fcv


def _save_member(ctx: CVRun, k: int, b: int, model, res, full: bool, meta: dict) -> None:
    """Bag member ``b`` of fold ``k``: ``model.pt`` for the first, ``model_bag<b>.pt`` after."""
    name = "model.pt" if b == 0 else f"model_bag{b}.pt"
    sel = {key: v for key, v in res.selection.items() if key != "stop_positions"}
    save_checkpoint(model, ctx.out / f"fold_{k}" / name, full,
                    {"backbone": ctx.backbone, "fold": k, "config_hash": ctx.hash,
                     "bag_member": b, "best_epoch": res.best_epoch,
                     "best_macro_f1": res.best_score, "selection": sel, **meta})
    if b == 0:  # members of an earlier, larger bag are not this run's
        n = int(ctx.cfg.get("bag", 1))
        for old in (ctx.out / f"fold_{k}").glob("model_bag*.pt"):
            member = old.stem[len("model_bag"):]
            if not member.isdigit() or int(member) >= n:
                old.unlink()


def _bag_record(members: list, tr: pd.DataFrame) -> dict:
    """What ``done.json`` keeps of the bag: each member's chosen epoch and score."""
    if len(members) < 2:
        return {"bag": 1}
    return {"bag": len(members),
            "bag_members": [{"best_epoch": m.best_epoch,
                             "val_macro_f1": m.best_score if m.best_score == m.best_score
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


# --------------------------------------------------------------------------- assembly
def _read_probs(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"sample_index": str, "label": str}, keep_default_na=False)


def _assemble(ctx: CVRun, marks: dict[int, dict]) -> dict:
    """Fold outputs -> ``oof.csv``, ``test.csv``, ``tta/``, ``metrics.json`` (last)."""
    out, folds, views, n_folds = ctx.out, ctx.folds, ctx.views, ctx.n_folds
    oof_view, test_view = {}, {}
    for v in views:
        parts = [_read_probs(out / f"fold_{k}" / "tta" / f"oof_{v}.csv") for k in range(n_folds)]
        oof = pd.concat(parts, ignore_index=True)
        counts = oof.sample_index.value_counts()
        if len(oof) != len(folds) or set(oof.sample_index) != set(folds.sample_index) \
                or counts.max() != 1:
            raise KitError(f"{out}: fold predictions do not cover every image of "
                           f"{ctx.paths.folds_csv} exactly once; rerun with --restart")
        oof_view[v] = oof.set_index("sample_index").loc[folds.sample_index].reset_index()
        tests = [_read_probs(out / f"fold_{k}" / "tta" / f"test_{v}.csv") for k in range(n_folds)]
        ids = tests[0].sample_index
        if any(not t.sample_index.equals(ids) for t in tests):
            raise KitError(f"{out}: fold test predictions list different images; "
                           "rerun with --restart")
        test_view[v] = prob_frame(ids, np.mean([t[PROB_COLUMNS].to_numpy() for t in tests], 0))
    oof_main = oof_view[views[0]][["sample_index", "fold", "label"]].copy()
    probs = np.mean([oof_view[v][PROB_COLUMNS].to_numpy() for v in views], axis=0)
    oof_main[PROB_COLUMNS] = probs
    test_main = prob_frame(test_view[views[0]].sample_index,
                            np.mean([test_view[v][PROB_COLUMNS].to_numpy() for v in views], 0))

    (out / "metrics.json").unlink(missing_ok=True)  # the commit mark of the assembled files
    tta_dir = out / "tta"
    for stale in tta_dir.glob("*.csv") if tta_dir.exists() else []:
        if stale.stem.split("_", 1)[-1] not in views:
            stale.unlink()
    for v in views:
        atomic_write_csv(tta_dir / f"oof_{v}.csv", oof_view[v], FLOAT_FORMAT)
        atomic_write_csv(tta_dir / f"test_{v}.csv", test_view[v], FLOAT_FORMAT)
    atomic_write_csv(out / "oof.csv", oof_main, FLOAT_FORMAT)
    attention = [out / f"fold_{k}" / "attention.csv" for k in range(n_folds)]
    if all(p.exists() for p in attention):
        atomic_write_csv(out / "attention.csv",
                         pd.concat([_read_probs(p) for p in attention], ignore_index=True),
                         FLOAT_FORMAT)
    else:
        (out / "attention.csv").unlink(missing_ok=True)
    atomic_write_csv(out / "test.csv", test_main, FLOAT_FORMAT)

    issues_summary = _assemble_issues(ctx)
    y = oof_main.label.to_numpy()
    summary = classification_summary(y, probs)
    ci = bootstrap_ci(y, probs)
    per_fold = []
    for k in range(n_folds):
        sel = oof_main.fold.to_numpy() == k
        m = marks[k]
        per_fold.append({"fold": k, "n": int(sel.sum()), "macro_f1": macro_f1(y[sel], probs[sel]),
                         "weighted_f1": weighted_f1(y[sel], probs[sel]),
                         "val_macro_f1_id": m["val_macro_f1"], "best_epoch": m["best_epoch"],
                         "epochs": m["epochs"], "seconds": m["seconds"],
                         "collapsed": collapse_reason(y[sel], probs[sel])})
    cfg_record = {"backbone": ctx.backbone, "weights": ctx.fused.weights if ctx.fused
                  else str(ctx.weights), "seed": ctx.seed, "params": ctx.params_desc,
                  "training_path": ctx.training_path,
                  **({"fusion": ctx.fused.record()} if ctx.fused else {}), **ctx.cfg}
    metrics = {
        "backbone": ctx.backbone, "oof_macro_f1": summary["macro_f1"],
        # Over images (1000 seeded resamples): how far another draw of images could move it.
        "oof_macro_f1_ci95": list(ci),
        "oof_weighted_f1": summary["weighted_f1"], "oof_accuracy": summary["accuracy"],
        "per_fold": per_fold, "per_class": summary["per_class"],
        "confusion": summary["confusion"], "classes": list(CLASSES),
        "per_view_macro_f1": {v: macro_f1(y, oof_view[v][PROB_COLUMNS].to_numpy())
                              for v in views},
        "views": list(views), "aggregate": ctx.cfg["head"]["pool"],
        "n_oof": len(oof_main), "n_test": len(test_main),
        "folds_sha256": ctx.folds_sha, "patch_keys": ctx.keys,
        "config_hash": ctx.hash, "config": cfg_record,
        "weights_source": marks[0]["weights_source"],
        "trainable_params": marks[0]["trainable_params"],
        "seconds": round(sum(m["seconds"] for m in marks.values()), 1),
        "training_path": ctx.training_path,
        "selection": {**_selection(ctx.cfg, ctx.training_path),
                      "configured": str(ctx.cfg.get("early_stopping"))},
        # Folds whose model predicts (nearly) one class or does no better than the majority
        # class: flagged here, in the run output, the report and the blend.
        "collapsed_folds": [f["fold"] for f in per_fold if f["collapsed"]],
        "collapsed": collapse_reason(y, probs),
        # How the parameters were chosen (kit.training.cv.run_cv fills ctx.params_source).
        "params_source": ctx.params_source or {"description": ctx.params_desc},
        "bag": int(ctx.cfg.get("bag", 1)),
        "label_issues": issues_summary,
        "versions": package_versions(),
    }
    if ctx.training_path == "feature_cache":
        metrics["feature_cache"] = {**marks[0].get("feature_cache", {}),
                                    "not_applied": pixel_augment_not_applied(ctx.cfg)}
    plot_confusion(summary["confusion"], CLASSES, out / "confusion.png",
                   title=f"{ctx.backbone} OOF, macro F1 {summary['macro_f1']:.3f}")
    write_config(out / "config.yaml", cfg_record)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def _assemble_issues(ctx: CVRun) -> dict:
    """``runs/<bb>/label_issues.csv`` from the folds' files (one row per training image: its
    label, the suggested label, its quality and the folds that flagged it) and the summary
    for metrics.json; removes a stale file when label issues are off."""
    path = ctx.out / label_issues.FILE
    mode = ctx.cfg["label_issues"]["mode"]
    if mode == "off":
        path.unlink(missing_ok=True)
        return {"mode": "off"}
    frames = [_read_probs(ctx.out / f"fold_{k}" / label_issues.FILE) for k in range(ctx.n_folds)]
    table = label_issues.summarise(frames)
    atomic_write_csv(path, table, FLOAT_FORMAT)
    return {"mode": mode, "model": ctx.cfg["label_issues"]["model"],
            "inner_folds": int(ctx.cfg["label_issues"]["inner_folds"]),
            "n_images": int(len(table)), "n_flagged": int(table.flagged.sum()),
            "file": str(path)}


def _selection(cfg: dict, path: str = "pixels") -> dict:
    """How every fold chose its epoch, for metrics.json, the blend manifest and the report."""
    if cfg["head"].get("type") == "logreg":
        return {"early_stopping": "probe", "epochs_honest": True, "inner_folds":
                int(cfg["inner_folds"]), "description": "linear probe: C chosen on an inner "
                "split of each fold's training images, then refit on them all"}
    mode = early_stopping_mode(cfg, path)
    text = {"inner": "early stopping on an inner split of each fold's training images",
            "refit": "epoch count chosen on an inner split, then refit on all training images",
            "none": f"a fixed {cfg['epochs']} epochs",
            "oof": "early stopping on the fold's own OOF images (optimistic)"}[mode]
    out = {"early_stopping": mode, "epochs_honest": is_honest(mode), "description": text}
    if mode in ("inner", "refit"):
        out["inner_folds"] = int(cfg["inner_folds"])
    return out


# --------------------------------------------------------------------------- stage
def run_cv(backbone: str, paths: Paths, cfg: Layered | None = None, seed: int = 42,
           weights="auto", fold: int | None = None, params=None, device=None,
           restart: bool = False, feature_cache: bool = True) -> dict:
    """Train ``backbone`` on every fold (or fold ``fold``) and assemble its predictions.

    Parameters
    ----------
    backbone : str
        A registered backbone (:func:`kit.models.backbones.list_backbones`).
    paths : kit.paths.Paths
        Reads ``folds/folds.csv`` and ``runs/patches/``; writes ``runs/<backbone>/``.
    cfg : kit.config.Layered
        The settings the command resolved (:func:`kit.config.train_settings`: the defaults of
        ``train.yaml`` with its ``augment`` and ``features`` sections, and the user's
        overrides, applied last).
    seed : int
        Fold ``k`` trains with seed ``seed + k``.
    weights : {"auto", "random"} or path
        Backbone weights (see :mod:`kit.models.weights`).
    fold : int, optional
        Train this fold only; the backbone's files are assembled once every fold is done.
    params : dict or {"tuned", "best", "none"} or path, optional
        Dotted-key overrides (``runs/tune/<bb>/best.yaml`` has them), applied before ``cfg``.
    device : str, optional
        ``cpu``, ``cuda``, ``mps``; default: the best available.
    restart : bool
        Retrain even folds that are done (only ``fold`` when given).
    feature_cache : bool
        When the config trains nothing in the backbone (no norm layer, no block), embed every
        patch and view once (``runs/features/``) and train the heads on the cached vectors:
        the same files for a fraction of the compute, without pixel augmentation (colour
        jitter, CutMix; flips become a random cached view). False: always train on pixels.

    Returns
    -------
    dict
        The metrics (``metrics.json``) once assembled; otherwise ``{"assembled": False,
        "pending": [...], "folds": {k: done mark}}``.
    """
    cfg = fusion.frozen_defaults(backbone, cfg)  # checks every part's name
    params, params_desc, params_source = resolve_params(params, paths, backbone, cfg,
                                                        feature_cache, with_source=True)
    cfg = train_config(cfg, params)
    views = tta_views(cfg["tta"])
    folds, folds_sha, train, test = _inputs(paths, backbone, cfg)
    n_folds = int(folds.fold.max()) + 1
    if fold is not None and not 0 <= int(fold) < n_folds:
        raise KitError(f"--fold {fold}: {paths.folds_csv} has folds 0..{n_folds - 1}")
    out = paths.backbone_dir(backbone)
    if restart:
        _restart(out, fold)
    marks = _check_folds_unchanged(out, folds_sha, n_folds)
    keys = {"train": train.key, "test": test.key}
    path = training_path(cfg, feature_cache)
    dtype = cfg["features"]["dtype"] if path == "feature_cache" else None
    dev = pick_device(device)
    fused = fusion.build(backbone, weights, cfg, path, views, train, test, seed, dev)
    weights = fused.weights if fused else weights  # a fused run: {part: weights}, resolved
    ctx = CVRun(paths=paths, backbone=backbone, weights=weights, seed=int(seed), cfg=cfg,
                views=views, folds=folds, folds_sha=folds_sha, train=train, test=test, out=out,
                keys=keys, n_folds=n_folds, device=dev, params_desc=params_desc,
                params_source=params_source, training_path=path, fused=fused,
                hash=config_hash(backbone, weights, seed, cfg, keys, path, dtype, dev.type,
                                 fused.record() if fused else None))
    log.info(f"{backbone}: {n_folds} folds, {len(folds)} training images, {len(test.samples)} "
             f"test images, device {ctx.device}, params: {params_desc}")
    if is_mil_config(cfg["head"]) and path == "pixels" and \
            float(cfg["augment"].get("cutmix_alpha") or 0) > 0:
        log.info(f"{backbone}: head.pool attention trains on whole images: CutMix (which mixes "
                 "patches of two classes) is not applied")
    if path == "feature_cache":
        _explain_feature_cache(backbone, cfg, views)
    elif training_path(cfg) == "feature_cache":
        log.info(f"{backbone}: frozen backbone, but --no-feature-cache: training on pixels")
    t0 = time.perf_counter()
    todo = []
    for k in ([int(fold)] if fold is not None else range(n_folds)):
        mark = marks.get(k)
        if mark is not None and mark.get("config_hash") == ctx.hash:
            log.info(f"{backbone} fold {k}: done earlier (macro F1 {mark['macro_f1']:.3f}), skipped")
            continue
        if mark is not None:
            log.info(f"{backbone} fold {k}: config changed since it was trained; retraining")
        todo.append(k)
    if todo and path == "feature_cache":  # one embedding pass, then a head per fold
        marks.update(_feature_folds(todo, ctx))
    elif todo:
        for k in todo:
            marks[k] = _train_fold(k, ctx)
    pending = [k for k in range(n_folds)
               if k not in marks or marks[k].get("config_hash") != ctx.hash]
    if pending:
        names = ", ".join(map(str, pending))
        log.info(f"{backbone}: fold(s) {names} not done with this config yet; outputs assemble "
                 f"once they are (./run.sh cv {backbone} trains them)")
        return {"assembled": False, "pending": pending, "folds": marks}
    metrics = _assemble(ctx, marks)
    for f in metrics["per_fold"]:
        if f["collapsed"]:
            log.warning(f"{backbone} fold {f['fold']}: WARNING: collapsed model: {f['collapsed']}")
    if metrics["collapsed"]:
        log.warning(f"{backbone}: WARNING: the OOF predictions look collapsed: {metrics['collapsed']}; "
                    "the model learnt nothing its score can show (check the weights and features)")
    tag = "" if metrics["selection"]["epochs_honest"] else \
        " [OPTIMISTIC: epochs chosen on these OOF images, early_stopping oof]"
    li = metrics["label_issues"]
    if li["mode"] != "off":
        log.info(f"{backbone}: label_issues {li['mode']}: {li['n_flagged']} of {li['n_images']} "
                 f"training images flagged by at least one fold -> {li['file']}")
    log.info(f"{backbone}: OOF macro F1 "
             f"{format_ci(metrics['oof_macro_f1'], metrics['oof_macro_f1_ci95'])}{tag} (weighted "
             f"{metrics['oof_weighted_f1']:.3f}) over {metrics['n_oof']} images, "
             f"{metrics['trainable_params']:,} trainable parameters, "
             f"{time.perf_counter() - t0:.0f} s -> {out}")
    return metrics


def _explain_feature_cache(backbone: str, cfg: dict, views) -> None:
    """Say which path runs and what it does not apply, before any work starts."""
    skipped = pixel_augment_not_applied(cfg)
    parts = backbone.split(fusion.SEP)  # a fused run: one head on the parts' caches side by side
    log.info(f"{backbone}: frozen backbone{'s' * (len(parts) > 1)}: training heads on cached "
             f"embeddings ({', '.join(f'runs/features/{p}/' for p in parts)}"
             f"{'; --no-feature-cache trains on pixels instead' * (len(parts) == 1)})")
    if skipped:
        log.info(f"{backbone}: pixel augmentation is not applied on this path ("
                 f"{', '.join(f'{k}={v}' for k, v in skipped.items())}); each patch is drawn in "
                 f"a random cached view ({', '.join(cache_views(views))}) per epoch instead")
