"""One outer fold, on either training path: label issues screened on its training images,
the bag of models, and their predictions; :class:`FeatureCV` drives it over cached embeddings."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from kit.artifacts import read_folds
from kit.config import Layered, merge
from kit.data.patches import patches_for
from kit.metrics import collapse_reason, macro_f1, prob_frame, score, weighted_f1
from kit.models.backbones import list_backbones, native_size
from kit.models.heads import create_head
from kit.task import Task, default_task
from kit.training import label_issues
from kit.training.checkpoints import weights_digest
from kit.training.device import pick_device
from kit.training.features import Features, cache_backbone, load_or_embed
from kit.training.selection import member_seed
from kit.training.settings import train_config, tta_views
from kit.training.sources import (
    FeatureSource,
    as_tensor,
    image_probs_from_features,
    row_tensor,
    threads,
)
from kit.training.train import fit
from kit.utils import KitError, progress, seed_everything


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
    score: float  # the task's metric
    fit: object  # kit.training.selection.FoldResult (bag member 0)
    test_probs: np.ndarray | None = None
    test_per_view: dict[str, np.ndarray] | None = None
    members: list = field(default_factory=list)  # every bag member's FoldResult
    issues: object = None  # kit.training.label_issues.FoldIssues, when label_issues is on


class FeatureCV:
    """Cached embeddings aligned with the folds; :meth:`fold` trains and predicts one fold.

    Fold ``k`` is seeded with ``seed + k`` (as :func:`kit.training.cv.run_cv`), so a fold's
    result does not depend on which folds ran before it: the tune objective may visit folds in
    any order. ``task`` (default: the built-in one) gives the classes (the heads' outputs, the
    probability columns) and the metric that scores folds and chooses epochs.
    """
    def __init__(self, train: Features, folds: pd.DataFrame, cfg: dict, views,
                 test: Features | None = None, device="cpu", seed: int = 42, threads: int = 1,
                 settings: Layered | None = None, task: Task | None = None):

        self.cfg, self.seed, self.device = cfg, int(seed), torch.device(device)
        self.task = default_task() if task is None else task
        # What configure() resolves params against: the command's settings, else cfg itself.
        self.settings = settings if settings is not None else Layered(cfg)
        self.threads = int(threads) if self.device.type == "cpu" else 0
        self.views = tuple(views)  # the config's TTA views, averaged in the predictions
        self.view_idx = [train.views.index(v) for v in self.views]
        self.train, self.test = train, test
        self.folds = _align(folds, train.samples, train.path, self.task.classes)
        self.x = as_tensor(train.array)  # n x K x V x D float32 in memory
        self.x_test = None if test is None else as_tensor(test.array)
        self.n_folds = int(self.folds.fold.max()) + 1

    def configure(self, params: dict | None = None,
                  overrides: dict | None = None) -> "FeatureCV":
        """A copy sharing the embeddings, with the training config resolved from ``params``
        (dotted keys) and ``overrides`` (nested) over the settings it was prepared with."""
        tcfg = train_config(self.settings.plus(overrides), params)
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

        f = self.folds
        drop = {int(k)} | {int(e) for e in exclude}
        tr, va = f[~f.fold.isin(drop)], f[f.fold == k]
        seed = self.seed + k
        source = FeatureSource(self.x, self.cfg, self.device)
        with threads(self.threads):
            issues = None
            if self.cfg["label_issues"]["mode"] != "off":
                # From the fold's training rows alone: its own (OOF) labels decide nothing.
                issues = label_issues.find_fold_issues(source, tr, self.cfg, seed, k,
                                                       desc=f"fold {k} ", task=self.task)
            x_val = self.x[row_tensor(va.row)]
            n_classes = len(self.task.classes)
            members, per_view, test_per_view = train_bag(
                source, lambda: create_head(self.x.shape[-1], n_classes, **self.cfg["head"]),
                tr, self.cfg, seed, self.device, lambda m: self._image_probs(m, x_val),
                (lambda m: self._image_probs(m, self.x_test))
                if with_test and self.x_test is not None else None,
                val_rows=va.row.values, val_y=va.y.values, issues=issues, desc=f"fold {k}",
                metric=self.task.metric)
        probs = np.mean(list(per_view.values()), axis=0)
        pred = FoldPrediction(k, va.sample_index.values, va.y.values, probs, per_view,
                              macro_f1(va.y.values, probs),
                              score(self.task.metric, va.y.values, probs, self.task.classes),
                              members[0], members=members, issues=issues)
        if test_per_view is not None:
            pred.test_per_view = test_per_view
            pred.test_probs = np.mean(list(test_per_view.values()), axis=0)
        return pred

    def _image_probs(self, head, x) -> dict[str, np.ndarray]:
        probs = image_probs_from_features(head, x, self.view_idx, self.cfg["head"]["pool"])
        return {v: probs[i] for v, i in zip(self.views, self.view_idx)}


def train_bag(source, make_model, tr: pd.DataFrame, cfg: dict, seed: int, device, predict_val,
              predict_test=None, *, val_rows=None, val_y=None, issues=None,
              desc: str = "fold", metric: str = "macro_f1"):
    """Train ``cfg["bag"]`` models on the training images ``tr`` (less those label issues
    drop, weighted as they say) and average their view probabilities: the one fold driver of
    both paths (a head on ``source``'s cached embeddings, or a backbone and head on pixels).

    Each member is seeded, then built by ``make_model()`` and trained by
    :func:`kit.training.train.fit`; ``predict_val(model)`` and ``predict_test(model)`` give
    ``{view: n x C}``. Returns ``(members, val_views, test_views)`` with every member's
    :class:`kit.training.selection.FoldResult`; member 0 is seeded ``seed``, so ``bag: 1``
    trains exactly the unbagged model. ``val_rows``/``val_y`` choose the epoch only with
    ``early_stopping: oof``; ``metric`` (the task's) is what chooses it. The inner split keeps
    each group of ``tr`` (:func:`fold_groups`) on one side.
    """
    keep, weight = label_issues.training_weights(issues, cfg)
    fit_tr = tr if keep is None else tr[keep]
    members, val_views, test_views = [], [], []
    n_bag = int(cfg["bag"])
    for b in range(n_bag):
        s = member_seed(seed, b)
        seed_everything(s)
        res = fit(make_model(), source, fit_tr.row.values, fit_tr.y.values, cfg,
                  val_rows=val_rows, val_y=val_y, groups=fold_groups(fit_tr), seed=s,
                  device=device, desc=desc if n_bag == 1 else f"{desc} bag {b + 1}/{n_bag}",
                  sample_weight=None if weight is None else weight[keep], metric=metric)
        members.append(res)
        val_views.append(predict_val(res.model))
        if predict_test is not None:
            test_views.append(predict_test(res.model))
    return members, mean_views(val_views), mean_views(test_views) if test_views else None


def mean_views(parts: list[dict]) -> dict:
    """Per view, the mean of the bag members' probabilities (one member: its own, as is)."""
    if len(parts) == 1:
        return parts[0]
    return {v: np.mean([p[v] for p in parts], axis=0) for v in parts[0]}


def fold_groups(frame: pd.DataFrame):
    """Groups the inner early-stopping split keeps together: the folds file's ``group``
    column when it has one (a patient of the task's ``labels.group``, images sharing a mask
    or a near-duplicate), else None."""
    return frame.group.values if "group" in frame.columns else None


def _align(folds: pd.DataFrame, samples: pd.DataFrame, where, classes) -> pd.DataFrame:
    """Folds with ``row`` (row of the cache) and ``y`` (index in ``classes``) columns."""
    rows = pd.Series(np.arange(len(samples)), index=samples.sample_index.values)
    missing = sorted(set(folds.sample_index) - set(rows.index))
    if missing:
        raise KitError(f"{len(missing)} images of folds/folds.csv are not in the patch cache "
                       f"behind {where} (e.g. {missing[0]}); rerun ./run.sh patches and "
                       "./run.sh folds --force")
    return folds.assign(row=rows.loc[folds.sample_index].values,
                        y=[classes.index(c) for c in folds.label])


def prepare(backbone, paths, params: dict | None = None, settings: Layered | None = None,
            weights="auto", seed: int = 42, device=None, with_test: bool = True,
            features_cfg: dict | None = None, task: Task | None = None) -> FeatureCV:
    """Load folds and patches, embed (or read the cache), and return a :class:`FeatureCV`.

    ``backbone`` is a registered name or an already built :class:`kit.models.backbones.Backbone`;
    ``params`` (dotted keys) and ``settings`` (the command's,
    :func:`kit.config.train_settings`) resolve as in :func:`kit.training.cv.run_cv`;
    ``task`` (default: the built-in one) as :class:`FeatureCV`'s.
    """
    task = default_task() if task is None else task
    cfg = train_config(settings, params)
    views = tta_views(cfg["tta"])
    folds, _ = read_folds(paths.folds_csv, classes=task.classes)
    name = backbone if isinstance(backbone, str) else getattr(backbone, "name", None)
    native = native_size(name) if name in list_backbones() else None
    train, *rest = patches_for(paths, native, cfg["patches_size"],
                               ("train", "test") if with_test else ("train",), backbone=name)
    test = rest[0] if rest else None
    fcfg = merge(cfg["features"], features_cfg or {}, source="features")
    dev = pick_device(None if fcfg["device"] == "auto" else fcfg["device"]) \
        if device is None else pick_device(device)
    if isinstance(backbone, str):
        backbone = cache_backbone(backbone, cfg, train, weights, seed, dev)
    digest = weights_digest(backbone)
    ftrain = load_or_embed(backbone, train, paths, "train", views, fcfg, dev, digest)
    ftest = load_or_embed(backbone, test, paths, "test", views, fcfg, dev, digest) \
        if test is not None else None
    return FeatureCV(ftrain, folds, cfg, views, ftest, dev, seed, int(fcfg["threads"]), settings,
                     task)


@dataclass
class FeaturesCVResult:
    """:func:`features_cv`'s outputs, in the shapes of cv's files (docs/DESIGN.md)."""

    oof: pd.DataFrame  # sample_index, fold, label, p_<class>... (TTA mean), folds-file order
    per_fold: list[dict]
    test: pd.DataFrame | None  # sample_index, p_<class>... (mean over folds and views)
    oof_macro_f1: float
    oof_weighted_f1: float
    oof_score: float  # the task's metric (metric)
    metric: str
    oof_views: dict[str, pd.DataFrame]
    test_views: dict[str, pd.DataFrame]
    views: tuple[str, ...]
    cfg: dict
    features: dict  # cache keys, folders, weights digest/source, hits


def features_cv(backbone, paths, params: dict | None = None, seed: int = 42,
                settings: Layered | None = None, weights="auto", device=None, folds=None,
                with_test: bool = True, on_fold=None, task: Task | None = None
                ) -> FeaturesCVResult:
    """Cross-validation of a head on cached embeddings: what ``cv`` computes when nothing in
    the backbone trains, for a fraction of the compute.

    Parameters
    ----------
    backbone : str or Backbone
    paths : kit.paths.Paths
    params : dict, optional
        Dotted overrides (best.yaml), as in :func:`kit.training.cv.run_cv`.
    settings : kit.config.Layered
        The command's settings (:func:`kit.config.train_settings`).
    seed : int
        Fold ``k`` trains with ``seed + k``; the backbone is built after seeding ``seed``.
    folds : list of int, optional
        Only these folds (default: all); the OOF frame then covers their images only.
    on_fold : callable, optional
        ``on_fold(k, FoldPrediction)`` after each fold (progress, pruning).
    task : kit.task.Task, optional
        The classes and the metric (default: the built-in task); a prepared
        :class:`FeatureCV` has its own.

    Returns
    -------
    FeaturesCVResult
    """
    fcv = backbone if isinstance(backbone, FeatureCV) else prepare(
        backbone, paths, params, settings, weights, seed, device, with_test, task=task)
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
    task = fcv.task
    classes = task.classes
    labels = np.array([classes[i] for i in np.concatenate([p.y for p in preds])], dtype=object)

    def ordered(probs):
        df = prob_frame(ids, probs, classes=classes, fold=folds_col, label=labels)
        return df.set_index("sample_index").loc[order.values].reset_index()

    oof = ordered(np.concatenate([p.probs for p in preds]))
    oof_views = {v: ordered(np.concatenate([p.per_view[v] for p in preds])) for v in fcv.views}
    test = test_views = None
    if preds and preds[0].test_probs is not None:
        tid = fcv.test.samples.sample_index.values
        test = prob_frame(tid, np.mean([p.test_probs for p in preds], axis=0), classes=classes)
        test_views = {v: prob_frame(tid, np.mean([p.test_per_view[v] for p in preds], axis=0),
                                    classes=classes)
                      for v in fcv.views}
    y, probs = oof.label.to_numpy(), oof[task.prob_columns].to_numpy()
    per_fold = [{"fold": p.fold, "n": int(len(p.y)), "macro_f1": p.macro_f1, "score": p.score,
                 "weighted_f1": weighted_f1(p.y, p.probs),
                 f"val_{task.metric}_id": p.fit.best_score,
                 "best_epoch": p.fit.best_epoch, "epochs": p.fit.epochs,
                 "collapsed": collapse_reason(p.y, p.probs, classes=classes, metric=task.metric),
                 "seconds": round(p.fit.seconds, 2)} for p in preds]
    info = {"train_key": fcv.train.key, "train_dir": str(fcv.train.path),
            "train_hit": fcv.train.hit, "weights_sha256": fcv.train.meta.get("weights_sha256"),
            "weights_source": fcv.train.meta.get("weights_source")}
    if fcv.test is not None:
        info.update(test_key=fcv.test.key, test_dir=str(fcv.test.path), test_hit=fcv.test.hit)
    yi = np.array([classes.index(c) for c in y], dtype=np.int64)
    return FeaturesCVResult(oof, per_fold, test, macro_f1(yi, probs), weighted_f1(yi, probs),
                            score(task.metric, yi, probs, classes), task.metric,
                            oof_views, test_views or {}, fcv.views, fcv.cfg, info)
