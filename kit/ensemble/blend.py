"""Blend the backbones' out-of-fold probabilities into one validated submission.

This module reads and cross-checks the inputs (every backbone's ``oof.csv``, ``test.csv`` and
``metrics.json`` against ``folds/folds.csv``, the task's test images, classes and metric),
records their provenance
(is the nested score the expected one, or optimistic?), and writes the submission, its
manifest and ``runs/blend/``. The searches themselves (weights over the library, class
biases, the nested per-fold fits) are :class:`kit.ensemble.search.BlendSearch`, on arrays;
the lines ``./run.sh blend`` prints are :mod:`kit.ensemble.blend_summary`'s.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kit.artifacts import read_folds, read_metrics, read_oof, read_test, run_score
from kit.config import given
from kit.data.dataset import expected_test_ids, find_root
from kit.ensemble.biases import apply_rule
from kit.ensemble.search import BlendSearch, PriorRule, SearchResult
from kit.metrics import to_indices
from kit.paths import RESERVED_RUN_DIRS, Paths
from kit.task import Task, as_data, pattern_folder
from kit.utils import KitError, sha256_file

REQUIRED_FILES = ("oof.csv", "test.csv", "metrics.json")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------- inputs

@dataclass
class BlendInputs:
    """Everything the search needs, aligned: rows in ``folds/folds.csv`` order.

    ``oof`` is ``M x N x C`` and ``test`` ``M x T x C`` (M library models, C the task's
    classes); ``files`` maps every file read (relative to the work directory) to its sha256.
    """

    backbones: list[str]
    models: list[str]
    oof: np.ndarray
    test: np.ndarray
    ids: list[str]
    y: np.ndarray
    folds: np.ndarray
    test_ids: list[str]
    files: dict[str, str]
    meta: dict[str, dict]
    folds_sha256: str
    task: Task


def complete_backbones(paths: Paths) -> list[str]:
    """Backbones under ``runs/`` with all of oof.csv, test.csv and metrics.json, sorted."""
    if not paths.runs_dir.is_dir():
        return []
    return sorted(d.name for d in paths.runs_dir.iterdir()
                  if d.is_dir() and d.name not in RESERVED_RUN_DIRS
                  and all((d / f).is_file() for f in REQUIRED_FILES))


def load_inputs(paths: Paths, data, backbones=None, weight_views: bool = False) -> BlendInputs:
    """Read and cross-check the OOF/test probabilities of ``backbones`` (default: all complete)
    for the task of ``data`` (a :class:`kit.task.Data` or a dataset root).

    Raises
    ------
    KitError
        Missing files, a backbone trained on another folds file or for other classes or
        another metric than the task's, OOF rows that are not the images of
        ``folds/folds.csv``, test rows that are not the task's test images, or backbones (or
        views) covering different images.
    """
    data = as_data(data)
    task = data.task
    names = list(backbones) if backbones else complete_backbones(paths)
    if not names:
        raise KitError(f"no backbone outputs under {paths.runs_dir} (each needs "
                       f"{', '.join(REQUIRED_FILES)}); run ./run.sh cv <backbone> first")
    if len(set(names)) != len(names):
        raise KitError(f"backbone listed twice: {', '.join(names)}; name each once")
    missing = [f"{paths.backbone_dir(n) / f}" for n in names for f in REQUIRED_FILES
               if not (paths.backbone_dir(n) / f).is_file()]
    if missing:
        raise KitError(f"{len(missing)} blend input files missing; run ./run.sh cv <backbone> "
                       "for each backbone named (or leave it out)", missing)
    folds, folds_sha = read_folds(paths.folds_csv, classes=task.classes)
    test_ids = expected_test_ids(data, task=task)
    if not test_ids:
        raise KitError(f"{find_root(data, task)}: no test image matches images.test "
                       f"{task.images.test!r}; check --data{task.cite('images.test')}")
    files: dict[str, str] = {}
    meta, stale = {}, []
    for n in names:
        try:
            meta[n] = _read_metrics(paths, n, folds_sha, files, task)
        except KitError as exc:  # collect them: one message naming every backbone to redo
            stale.append(str(exc))
    if len(stale) == 1:
        raise KitError(stale[0])
    if stale:
        raise KitError(f"{len(stale)} backbones cannot be blended with {paths.folds_csv} for "
                       f"task {task.name}", stale)
    models, oof, test = [], [], []
    for name in names:
        for view, oof_path, test_path in _view_files(paths, name, weight_views):
            oof.append(_read_oof(oof_path, folds, paths, files, task))
            test.append(_read_test(test_path, test_ids, paths, files, task))
            models.append(name if view is None else f"{name}/{view}")
    return BlendInputs(backbones=names, models=models, oof=np.stack(oof), test=np.stack(test),
                       ids=list(folds.sample_index), y=to_indices(folds.label, task.classes),
                       folds=folds.fold.to_numpy(np.int64), test_ids=test_ids, files=files,
                       meta=meta, folds_sha256=folds_sha, task=task)


def _rel(paths: Paths, path: Path) -> str:
    try:
        return path.resolve().relative_to(paths.root).as_posix()
    except ValueError:
        return str(path.resolve())


def _read_metrics(paths: Paths, name: str, folds_sha: str, files: dict, task: Task) -> dict:
    path = paths.backbone_dir(name) / "metrics.json"
    metrics = read_metrics(path, classes=task.classes, metric=task.metric)
    files[_rel(paths, path)] = sha256_file(path)
    recorded = metrics.get("folds_sha256")
    if not recorded:
        raise KitError(f"{path}: no folds_sha256 recorded, so it cannot be matched to "
                       f"{paths.folds_csv}; rerun ./run.sh cv {name}")
    if recorded != folds_sha:
        raise KitError(f"{path}: trained on another folds file (folds_sha256 {recorded[:12]}... "
                       f"but {paths.folds_csv} is {folds_sha[:12]}...); rerun ./run.sh cv {name} "
                       "or leave it out of the blend")
    metric, score, _ = run_score(metrics)
    return {"config": metrics.get("config"), "weights_source": metrics.get("weights_source"),
            "oof_macro_f1": metrics.get("oof_macro_f1"), "metric": metric, "oof_score": score,
            "folds_sha256": recorded,
            "training_path": metrics.get("training_path"),
            "selection": metrics.get("selection"), "params_source": metrics.get("params_source"),
            "collapsed": collapse_note(metrics), **provenance(metrics)}


def collapse_note(metrics: dict) -> str | None:
    """The collapse guard's verdict on a backbone (``metrics.json``), in words, or None."""
    folds = metrics.get("collapsed_folds") or []
    if metrics.get("collapsed"):
        return f"its OOF predictions look collapsed: {metrics['collapsed']}"
    if folds:
        return f"fold(s) {', '.join(map(str, folds))} collapsed (one class, or no better than " \
               "the majority class)"
    return None


EPOCH_WORDS = {"inner": "early stopping on an inner split of the training folds",
               "refit": "epochs counted on an inner split, then a refit on all training folds",
               "none": "a fixed number of epochs",
               "oof": "early stopping on the fold's own OOF rows"}


def provenance(metrics: dict) -> dict:
    """How a backbone's OOF predictions chose their epochs and parameters, from its
    ``metrics.json`` (``selection``, ``params_source``), and whether its OOF score is honest.

    Returns ``{"honest", "epochs", "params", "why"}``: ``epochs``/``params`` in words, ``why``
    the reasons it is not honest (empty when it is). A metrics.json without these records
    (an older cv) is "unknown", hence not honest.
    """
    sel, src = metrics.get("selection"), metrics.get("params_source")
    why = []
    if isinstance(sel, dict) and sel.get("early_stopping"):
        mode = str(sel["early_stopping"])
        epochs = f"{mode}: {EPOCH_WORDS.get(mode, mode)}"
        if not sel.get("epochs_honest", mode != "oof"):
            why.append(f"epochs chosen on its own OOF rows (early_stopping {mode})")
    else:
        epochs = "unknown (metrics.json records no selection: an older cv)"
        why.append("how its epochs were chosen is not recorded (an older cv): rerun "
                   "./run.sh cv to record it")
    if isinstance(src, dict) and "honest" in src:
        params = src.get("description") or src.get("spec") or "?"
        if src.get("dropped"):
            params += f"; dropped for this path: {', '.join(src['dropped'])}"
        if not src["honest"]:
            why.append(f"params {src.get('why') or 'chosen on these folds'}")
    else:
        params = (src.get("description") if isinstance(src, dict) else None) or "unknown"
        params += " (metrics.json does not say how they were chosen: an older cv)"
        why.append("how its params were chosen is not recorded (an older cv)")
    return {"honest": not why, "epochs": epochs, "params": params, "why": why}


def expected_score(nested: float, meta: dict[str, dict], metric: str = "macro_f1",
                   macro_f1: float | None = None) -> dict:
    """The blend's nested score in ``metric`` with what it is worth: ``label`` ``expected``
    when every input's OOF predictions chose nothing on their own rows, else ``optimistic``
    with ``why`` (backbone -> reasons).

    Returns ``{"metric", "score", "macro_f1", "honest", "label", "why"}``; ``macro_f1`` is the
    nested macro F1 (``nested`` itself when the metric is macro F1, as AN2DL's records had it).
    """
    why = {bb: list(m.get("why") or []) for bb, m in meta.items()
           if not m.get("honest", False)}
    if macro_f1 is None and metric == "macro_f1":
        macro_f1 = nested
    return {"metric": metric, "score": float(nested),
            "macro_f1": None if macro_f1 is None else float(macro_f1), "honest": not why,
            "label": "expected" if not why else "optimistic", "why": why}


def _view_files(paths: Paths, name: str, weight_views: bool):
    """(view, oof path, test path) per library model of one backbone."""
    bdir = paths.backbone_dir(name)
    if not weight_views:
        return [(None, bdir / "oof.csv", bdir / "test.csv")]
    tta = bdir / "tta"
    oof_views = {p.name[len("oof_"):-len(".csv")] for p in tta.glob("oof_*.csv")}
    test_views = {p.name[len("test_"):-len(".csv")] for p in tta.glob("test_*.csv")}
    if not oof_views and not test_views:  # no TTA: the backbone's one view is its main file
        return [("mean", bdir / "oof.csv", bdir / "test.csv")]
    if oof_views != test_views:
        raise KitError(f"{tta}: OOF and test TTA views differ (oof: "
                       f"{', '.join(sorted(oof_views))}; test: {', '.join(sorted(test_views))}); "
                       f"rerun ./run.sh cv {name}")
    return [(v, tta / f"oof_{v}.csv", tta / f"test_{v}.csv") for v in sorted(oof_views)]


def _normalised(df: pd.DataFrame, path: Path, paths: Paths, files: dict,
                columns: list[str]) -> pd.DataFrame:
    """``df`` (read from ``path``, recorded in ``files``) with each row's probabilities
    (``columns``) scaled to sum to 1, as the blend weighs them."""
    files[_rel(paths, path)] = sha256_file(path)
    probs = df.loc[:, columns].to_numpy(np.float64)
    df.loc[:, columns] = probs / probs.sum(axis=1, keepdims=True)
    return df


def _same_images(path: Path, have, want, what: str) -> None:
    have, want = set(have), set(want)
    if have == want:
        return
    extra, missing = sorted(have - want), sorted(want - have)
    problems = [f"missing: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else "")
                ] if missing else []
    problems += [f"extra: {', '.join(extra[:10])}" + (" ..." if len(extra) > 10 else "")
                 ] if extra else []
    raise KitError(f"{path}: covers different images than {what} ({len(missing)} missing, "
                   f"{len(extra)} extra); rerun the cv stage for this backbone", problems)


def _read_oof(path: Path, folds: pd.DataFrame, paths: Paths, files: dict,
              task: Task) -> np.ndarray:
    df = _normalised(read_oof(path, classes=task.classes), path, paths, files,
                     task.prob_columns)
    _same_images(path, df.index, folds.sample_index, paths.folds_csv)
    df = df.loc[folds.sample_index]
    wrong = (df.fold.to_numpy() != folds.fold.to_numpy()) | (df.label.to_numpy()
                                                              != folds.label.to_numpy())
    if wrong.any():
        raise KitError(f"{path}: fold or label of {int(wrong.sum())} images differ from "
                       f"{paths.folds_csv} (e.g. {df.index[wrong][0]}); rerun the cv stage")
    return df.loc[:, task.prob_columns].to_numpy(np.float64)


def _read_test(path: Path, test_ids: list[str], paths: Paths, files: dict,
               task: Task) -> np.ndarray:
    df = _normalised(read_test(path, classes=task.classes), path, paths, files,
                     task.prob_columns)
    _same_images(path, df.index, test_ids, f"{pattern_folder(task.images.test) or '.'}/")
    return df.loc[test_ids, task.prob_columns].to_numpy(np.float64)


# ----------------------------------------------------------------------------- stage

@dataclass
class BlendResult:
    """A fitted blend; the ``*_path`` fields are set once :func:`run_blend` wrote its files."""

    inputs: BlendInputs
    search: SearchResult
    cfg: dict
    objective: str
    weight_views: bool
    seed: int
    name: str
    test_probs: np.ndarray
    test_labels: list[str]
    csv_path: Path | None = None
    manifest_path: Path | None = None
    latest_csv: Path | None = None
    latest_manifest: Path | None = None
    csv_sha256: str | None = None
    estimator: BlendSearch | None = None
    prior: PriorRule | None = None

    @property
    def weights(self) -> dict[str, float]:
        return dict(zip(self.inputs.models, map(float, self.search.fitted.weights)))

    @property
    def task(self) -> Task:
        return self.inputs.task

    @property
    def metric(self) -> str:
        """The name of the task's metric, which the blend was fitted for and scored in."""
        return self.task.metric

    @property
    def biases(self) -> dict[str, float]:
        return _per_class(self.search.fitted.biases, self.task.classes)

    @property
    def scores(self) -> dict:
        return self.search.scores

    @property
    def expected(self) -> dict:
        """The nested score, labelled ``expected`` or ``optimistic`` (:func:`expected_score`)."""
        nested = self.scores["nested"]
        out = expected_score(nested["score"], self.inputs.meta, self.metric, nested["macro_f1"])
        choice = self.scores.get("biases_choice")
        if choice:  # biases: auto picked the rule on these nested rows: say so beside the score
            out["chosen_between_two"] = (
                f"class biases {'applied' if choice['applied'] else 'not applied'} by biases: "
                f"auto (nested paired gain {choice['nested_gain']:+.3f}): the score is the "
                "better of two rules on these rows")
        return out

    @property
    def expected_ci95(self) -> list[float]:
        """95 % bootstrap interval over images of the expected (nested) score."""
        return list(self.scores["nested"]["ci95"])

    def prior_record(self) -> dict | None:
        """The class mix the test labels were decided for: ``mode`` (``train`` or ``em``), the
        OOF labels' mix, the mix applied (``test_mix``) and the class biases applied to the
        test rows; with ``em`` also EM's estimate, its steps and the likelihood-ratio test
        (``shifted``: whether it rejected the OOF mix, hence whether ``test_mix`` is EM's)."""
        rule = self.prior
        if rule is None:
            return None
        classes = self.task.classes
        out = {"mode": rule.mode, "train_mix": _per_class(rule.train_mix, classes),
               "test_mix": _per_class(rule.mix, classes),
               "biases_applied": _per_class(rule.biases, classes)}
        if rule.estimate is not None:
            est = rule.estimate
            out.update(em_mix=_per_class(est.em, classes), em_iterations=int(est.n_iter),
                       lr_statistic=float(est.statistic), p_value=float(est.p_value),
                       alpha=float(self.cfg["em_alpha"]), shifted=bool(est.shifted))
        return out

    def submission_frame(self) -> pd.DataFrame:
        """The submission: the task's id and label columns, one row per test id."""
        id_col, label_col = self.task.submission_columns
        return pd.DataFrame({id_col: self.inputs.test_ids, label_col: self.test_labels})

    def blend_record(self) -> dict:
        """The parameters that re-run this blend, and what it found."""
        return {"backbones": self.inputs.backbones, "objective": self.objective,
                "metric": self.metric,
                "weight_views": self.weight_views, "models": self.inputs.models,
                "weights": self.weights, "biases": self.biases, "params": self.cfg,
                "seed": self.seed, "prior": self.prior_record()}


def fit_blend(paths: Paths, data, cfg: dict, backbones=None, name: str = "blend",
              objective: str = "f1", weight_views: bool = False, seed: int = 42) -> BlendResult:
    """Load the inputs, fit weights and biases for the task's metric (all rows and nested),
    predict the test set.

    ``objective``: ``f1`` or ``metric`` (both the task's metric) or ``logloss``, what the
    weight search maximises. Writes nothing; :func:`run_blend` writes the files and
    ``reproduce`` compares them.
    """
    cfg = given(cfg, "blend")
    inputs = load_inputs(paths, data, backbones, weight_views)
    task = inputs.task
    est = BlendSearch(objective, cfg, seed).fit(inputs.oof, inputs.y, inputs.folds,
                                                models=inputs.models, metric=task.metric,
                                                classes=task.classes)
    rule = est.prior_rule(inputs.test)  # prior: em estimates the test mix here, once
    labels = [task.classes[i] for i in apply_rule(rule.probs, rule.biases, float(cfg["eps"]))]
    return BlendResult(inputs=inputs, search=est.result_, cfg=cfg, objective=objective,
                       weight_views=bool(weight_views), seed=int(seed), name=name,
                       test_probs=rule.probs, test_labels=labels, estimator=est, prior=rule)


def _per_class(values, classes) -> dict[str, float]:
    return dict(zip(classes, map(float, values)))


def fold_fit_record(models: list[str], fit, classes) -> dict:
    """One nested fit's weights and biases (``classes``: the task's), and with ``prior: em``
    the held-out fold's class mix and the biases applied for it."""
    out = {"weights": dict(zip(models, map(float, fit.weights))),
           "biases": _per_class(fit.biases, classes)}
    if fit.prior is not None:
        out.update(test_mix=_per_class(fit.prior.mix, classes),
                   em_mix=_per_class(fit.prior.estimate.em, classes),
                   p_value=float(fit.prior.estimate.p_value),
                   biases_applied=_per_class(fit.prior.biases, classes))
    return out
