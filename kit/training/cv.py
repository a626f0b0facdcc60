"""Cross-validated training of one backbone: ``runs/<bb>/oof.csv``, ``test.csv`` and friends.

Fold ``k`` trains on the other folds' images and validates on its own; its outputs go to
``runs/<bb>/fold_k/`` (``model.pt``, ``oof.csv``, ``test.csv``, ``tta/``) and ``done.json``
is written last, as the commit mark (:mod:`kit.training.cv_folds`). A rerun skips every
fold whose ``done.json`` matches the folds file and the run's config, so a killed run
resumes at the fold it was on and ``--fold K`` jobs on separate machines can share one
``runs/<bb>/``. Once every fold is done with the same config, the fold outputs are
assembled into the backbone's files (see docs/DESIGN.md; :mod:`kit.training.cv_assembly`);
``metrics.json`` is written last.

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
from pathlib import Path

import numpy as np
import pandas as pd

from kit.artifacts import read_folds
from kit.config import Layered
from kit.data.patches import patches_for
from kit.metrics import format_ci, get_metric
from kit.models.backbones import native_size
from kit.models.heads import is_mil_config
from kit.paths import Paths, check_run_name
from kit.task import Task, task_of
from kit.training import fusion
from kit.training.cv_assembly import assemble
from kit.training.cv_folds import train_feature_folds, train_pixel_fold
from kit.training.cv_run import CVRun
from kit.training.device import pick_device
from kit.training.features import cache_views
from kit.training.params import resolve
from kit.training.settings import pixel_augment_not_applied, task_salt, train_config, tta_views
from kit.training.settings import training_path as choose_path
from kit.utils import KitError, sha256_file, sha256_text

log = logging.getLogger(__name__)

# Config keys that change speed, not results: they do not invalidate finished folds.
# The embedding cache's settings (``features``) are left out too: what changes the vectors (the
# dtype, autocast) is in the cache key, and the dtype enters the hash on its own.
# ``patches_size`` only chooses the cache, whose keys enter the hash themselves.
_NOT_HASHED = ("num_workers", "eval_batch_size", "features", "patches_size")
_ASSEMBLED = ("oof.csv", "test.csv", "metrics.json", "confusion.png", "config.yaml",
              "attention.csv", "label_issues.csv")


# --------------------------------------------------------------------------- params
def resolve_params(spec, paths: Paths, backbone: str, settings: Layered | None = None,
                   feature_cache: bool = True, with_source: bool = False):
    """Dotted-key overrides from ``--params``: ``tuned``, ``best``, ``none``, a file or a dict.

    ``tuned`` uses ``runs/tune/<bb>/best.yaml`` when it exists, else nothing; ``best``
    requires it. Keys tuned for another training path than the one cv takes with ``settings``
    (command-line overrides) over them are dropped, with a printed note
    (:mod:`kit.training.params`). Returns ``(params, description)``, and with ``with_source`` also
    the ``params_source`` record of metrics.json (how the params were chosen).
    """
    sha = None
    if paths.folds_csv.exists():
        sha = sha256_file(paths.folds_csv)
    found = resolve(spec, paths, backbone, settings, feature_cache, sha)
    for note in found.notes:
        log.info(f"{backbone}: {note}")
    if with_source:
        return found.params, found.description, found.source
    return found.params, found.description


# --------------------------------------------------------------------------- inputs
def _inputs(paths: Paths, backbone: str, cfg: dict, task: Task):
    """Folds, their hash and both patch caches (of the size ``backbone`` trains on), checked
    against each other; ``y`` is each image's index in the task's classes."""
    folds, folds_sha = read_folds(paths.folds_csv, classes=task.classes)
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
    folds["y"] = [task.classes.index(c) for c in folds.label]
    return folds, folds_sha, train, test


def config_hash(backbone: str, weights, seed: int, cfg: dict, keys: dict,
                training_path: str = "pixels", features_dtype: str | None = None,
                device_type: str = "cpu", fused: dict | None = None,
                task: Task | None = None) -> str:
    """What a fold's outputs depend on, hashed (speed-only settings left out).

    ``training_path`` (and the cache's ``features_dtype``) enter only for the feature-cache path, so
    that its folds are never taken for pixel-trained ones. The device type enters because
    CPU and GPU kernels give different probabilities: folds trained on both are never
    assembled together. ``fused`` (a fused run's parts: weights digests, cache keys) enters
    when given. ``task``'s fingerprint enters unless it is the built-in AN2DL task (whose
    hashes stay as they were): its classes and metric decide what a fold trains and keeps.
    """
    hashed = {k: v for k, v in cfg.items() if k not in _NOT_HASHED}
    payload = {"backbone": backbone, "weights": str(weights), "seed": int(seed), "cfg": hashed,
               "patches": keys, "device_type": str(device_type)}
    if training_path != "pixels":
        payload.update(path=training_path, features_dtype=features_dtype)
    payload.update({"fused": fused} if fused else {})  # single runs keep their hashes
    payload.update(task_salt(task))
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


# --------------------------------------------------------------------------- stage
def run_cv(paths: Paths, data, settings: Layered, *, backbone: str, seed: int = 42,
           weights="auto", fold: int | None = None, params=None, device=None,
           restart: bool = False, feature_cache: bool = True, name: str | None = None) -> dict:
    """Train ``backbone`` on every fold (or fold ``fold``) and assemble its predictions.

    Parameters
    ----------
    paths : kit.paths.Paths
        Reads ``folds/folds.csv`` and ``runs/patches/``; writes ``runs/<name>/``.
    data : kit.task.Data, path or None
        The dataset, as the other stages take it: cv reads the patch caches, and its task
        (None: the built-in AN2DL task) gives the classes (``p_<class>`` columns, the head's
        outputs), the metric that scores folds and the run and chooses epochs, and, when it
        is not the built-in task, enters the config hash.
    settings : kit.config.Layered
        The settings the command resolved (:func:`kit.config.train_settings`: the defaults of
        ``train.yaml`` with its ``augment`` and ``features`` sections, and the user's
        overrides, applied last).
    backbone : str
        A registered backbone (:func:`kit.models.backbones.list_backbones`), or ``a+b``.
    seed : int
        Fold ``k`` trains with seed ``seed + k``.
    weights : {"auto", "random"} or path
        Backbone weights (see :mod:`kit.models.weights`).
    fold : int, optional
        Train this fold only; the backbone's files are assembled once every fold is done.
    params : dict or {"tuned", "best", "none"} or path, optional
        Dotted-key overrides (``runs/tune/<bb>/best.yaml`` has them), applied before the
        overrides of ``settings``.
    device : str, optional
        ``cpu``, ``cuda``, ``mps``; default: the best available.
    restart : bool
        Retrain even folds that are done (only ``fold`` when given).
    feature_cache : bool
        When the config trains nothing in the backbone (no norm layer, no block), embed every
        patch and view once (``runs/features/``) and train the heads on the cached vectors:
        the same files for a fraction of the compute, without pixel augmentation (colour
        jitter, CutMix; flips become a random cached view). False: always train on pixels.

    name : str, optional
        The run's name, its folder under ``runs/`` (default: ``backbone``): variants of one
        backbone (other settings) side by side, each blended, compared and reported by name.

    Returns
    -------
    dict
        The metrics (``metrics.json``) once assembled; otherwise ``{"assembled": False,
        "pending": [...], "folds": {k: done mark}}``.
    """
    task = task_of(data)
    run = check_run_name(name or backbone)
    title = get_metric(task.metric).title
    settings = fusion.frozen_defaults(backbone, settings)  # checks every part's name
    params, params_desc, params_source = resolve_params(params, paths, backbone, settings,
                                                        feature_cache, with_source=True)
    cfg = train_config(settings, params, feature_cache)
    views = tta_views(cfg["tta"])
    folds, folds_sha, train, test = _inputs(paths, backbone, cfg, task)
    n_folds = int(folds.fold.max()) + 1
    if fold is not None and not 0 <= int(fold) < n_folds:
        raise KitError(f"--fold {fold}: {paths.folds_csv} has folds 0..{n_folds - 1}")
    out = paths.backbone_dir(run)
    if restart:
        _restart(out, fold)
    marks = _check_folds_unchanged(out, folds_sha, n_folds)
    keys = {"train": train.key, "test": test.key}
    training_path = choose_path(cfg, feature_cache)
    dtype = cfg["features"]["dtype"] if training_path == "feature_cache" else None
    dev = pick_device(device)
    fused = fusion.build(backbone, weights, cfg, training_path, views, train, test, seed, dev)
    weights = fused.weights if fused else weights  # a fused run: {part: weights}, resolved
    ctx = CVRun(paths=paths, backbone=backbone, weights=weights, seed=int(seed), cfg=cfg,
                views=views, folds=folds, folds_sha=folds_sha, train=train, test=test, out=out,
                keys=keys, n_folds=n_folds, device=dev, params_desc=params_desc,
                params_source=params_source, training_path=training_path, fused=fused,
                hash=config_hash(backbone, weights, seed, cfg, keys, training_path, dtype,
                                 dev.type, fused.record() if fused else None, task), task=task,
                name=run)
    log.info(f"{backbone}: {n_folds} folds, {len(folds)} training images, {len(test.samples)} "
             f"test images, device {ctx.device}, params: {params_desc}")
    if is_mil_config(cfg["head"]) and training_path == "pixels" and \
            float(cfg["augment"]["cutmix_alpha"]) > 0:
        log.info(f"{backbone}: head.pool attention trains on whole images: CutMix (which mixes "
                 "patches of two classes) is not applied")
    if training_path == "feature_cache":
        _explain_feature_cache(backbone, cfg, views)
    elif choose_path(cfg) == "feature_cache":
        log.info(f"{backbone}: frozen backbone, but --no-feature-cache: training on pixels")
    t0 = time.perf_counter()
    todo = []
    for k in ([int(fold)] if fold is not None else range(n_folds)):
        mark = marks.get(k)
        if mark is not None and mark.get("config_hash") == ctx.hash:
            # "score" (the task's metric) is in marks written since tasks; the hash of an
            # older mark matches only for AN2DL, whose metric is macro F1.
            done_score = mark.get("score", mark["macro_f1"])
            log.info(f"{backbone} fold {k}: done earlier ({title} {done_score:.3f}), skipped")
            continue
        if mark is not None:
            log.info(f"{backbone} fold {k}: config changed since it was trained; retraining")
        todo.append(k)
    if todo and training_path == "feature_cache":  # one embedding pass, then a head per fold
        marks.update(train_feature_folds(todo, ctx))
    elif todo:
        for k in todo:
            marks[k] = train_pixel_fold(k, ctx)
    pending = [k for k in range(n_folds)
               if k not in marks or marks[k].get("config_hash") != ctx.hash]
    if pending:
        names = ", ".join(map(str, pending))
        log.info(f"{backbone}: fold(s) {names} not done with this config yet; outputs assemble "
                 f"once they are (./run.sh cv {backbone} trains them)")
        return {"assembled": False, "pending": pending, "folds": marks}
    metrics = assemble(ctx, marks)
    for f in metrics["per_fold"]:
        if f["collapsed"]:
            log.warning(f"{backbone} fold {f['fold']}: WARNING: collapsed model: {f['collapsed']}")
    if metrics["collapsed"]:
        log.warning(f"{backbone}: WARNING: the OOF predictions look collapsed: "
                    f"{metrics['collapsed']}; the model learnt nothing its score can show "
                    "(check the weights and features)")
    tag = "" if metrics["selection"]["epochs_honest"] else \
        " [OPTIMISTIC: epochs chosen on these OOF images, early_stopping oof]"
    li = metrics["label_issues"]
    if li["mode"] != "off":
        log.info(f"{backbone}: label_issues {li['mode']}: {li['n_flagged']} of {li['n_images']} "
                 f"training images flagged by at least one fold -> {li['file']}")
    also = (f"weighted {metrics['oof_weighted_f1']:.3f}" if task.metric == "macro_f1" else
            f"macro F1 {metrics['oof_macro_f1']:.3f}, weighted F1 "
            f"{metrics['oof_weighted_f1']:.3f}")
    log.info(f"{backbone}: OOF {title} "
             f"{format_ci(metrics['oof_score'], metrics['oof_score_ci95'])}{tag} ({also}) "
             f"over {metrics['n_oof']} images, "
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
