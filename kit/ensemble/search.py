"""The blend's searches, on arrays: weights over a library of models and class biases.

:class:`BlendSearch` is a scikit-learn-style estimator: ``fit(P, y, folds)`` on the OOF
probabilities ``P`` (``M x N x C``: M library models, N rows, C classes), then
``predict_proba`` / ``predict`` on any ``M x T x C`` array (the test set). It reads and writes
no files: :mod:`kit.ensemble.blend` checks the inputs, calls it, and writes the submission.

Three fitted pieces, all on the OOF rows:

- **weights**: non-negative, summing to 1, over a *library* of models (each backbone's TTA
  mean, or with ``weight_views`` each TTA view of each backbone). Found by Caruana-style
  greedy forward selection with replacement (Caruana et al., 2004): start from every model
  once (equal weights) or the best singles, then repeatedly add the model whose addition
  scores best, and keep the best prefix of that path. It needs no gradient, so it optimises
  macro F1 (piecewise constant in the weights) directly; ``objective="logloss"`` optimises
  log-loss instead. Optionally bagged over bootstrap resamples of the rows.
- **class biases**: the decision rule is ``argmax(log p + b)`` with ``b[0] = 0``; each other
  ``b[c]`` is tuned by coordinate ascent over a grid. Macro F1 rewards recall on small classes
  that plain argmax under-predicts; the gain is measured and printed.
- **honesty**: the whole fit (weights and biases) is repeated once per fold on the other
  folds' rows and applied to the held-out fold; the concatenated held-out predictions give
  the *nested* macro F1, the submission's expected score. The in-sample score is reported
  beside it, labelled optimistic. Every macro F1 comes with its 95 % bootstrap interval over
  images (:func:`kit.metrics.bootstrap_ci`).
- **class mix** (``prior: em``): the test rows' class mix is estimated by EM
  (:mod:`kit.ensemble.prior`); where it differs significantly from the OOF labels' mix, the
  test probabilities are adjusted to it and the biases refitted for it on the OOF rows
  reweighted to that mix (:meth:`BlendSearch.prior_rule`).

Every search step is vectorised over the candidates (numpy), so a 581 x 3 x 4 blend with its
nested fits takes well under a second.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from kit import CLASSES
from kit.config import given
from kit.ensemble.prior import PRIORS, MixEstimate, adjust_to_prior, class_mix, estimate_mix
from kit.metrics import bootstrap_ci, macro_f1, macro_f1_batch, paired_bootstrap, per_class_f1
from kit.utils import KitError, check_random_state

OBJECTIVES = ("f1", "logloss")


# ----------------------------------------------------------------------------- scoring

def _score_batch(probs: np.ndarray, y: np.ndarray, objective: str, eps: float) -> np.ndarray:
    """Higher-is-better score of each candidate blend (G x N x C)."""
    if objective == "f1":
        return macro_f1_batch(probs.argmax(axis=-1), y, probs.shape[-1])
    picked = np.take_along_axis(probs, y[None, :, None], axis=-1)[..., 0]
    return np.log(np.maximum(picked, eps)).mean(axis=-1)  # minus the log-loss


def apply_rule(probs: np.ndarray, biases: np.ndarray, eps: float) -> np.ndarray:
    """Class indices ``argmax(log p + b)``."""
    return (np.log(np.maximum(probs, eps)) + biases).argmax(axis=-1)


# ----------------------------------------------------------------------------- search

def greedy_weights(P: np.ndarray, y: np.ndarray, objective: str = "f1", iterations: int = 40,
                   init: str = "both", init_size: int = 1, eps: float = 1e-6):
    """Caruana greedy forward selection with replacement over the models of ``P`` (M x N x C).

    Returns ``(weights, score)``: the best prefix of the selection path (earliest on ties).
    ``init="equal"`` starts from every model once, ``"best"`` from the ``init_size`` best
    single models, ``"both"`` runs both paths and keeps the better (the equal start on ties):
    the result then never scores below equal weights nor the best single model on these rows.
    """
    results = [_greedy_path(P, y, objective, iterations, counts, eps)
               for counts in _start_counts(P, y, objective, init, init_size, eps)]
    return max(results, key=lambda r: r[1])  # max keeps the first of equal scores


def _greedy_path(P, y, objective, iterations, counts, eps):
    counts = counts.copy()
    total = np.tensordot(counts, P, axes=1)
    best_counts = counts.copy()
    best = float(_score_batch((total / counts.sum())[None], y, objective, eps)[0])
    for _ in range(iterations if P.shape[0] > 1 else 0):
        scores = _score_batch((total[None] + P) / (counts.sum() + 1), y, objective, eps)
        j = int(np.argmax(scores))
        counts[j] += 1
        total += P[j]
        if scores[j] > best + 1e-12:
            best, best_counts = float(scores[j]), counts.copy()
    return best_counts / best_counts.sum(), best


def _start_counts(P, y, objective, init, init_size, eps) -> list[np.ndarray]:
    """Where the greedy paths start: every model once and/or the ``init_size`` best singles."""
    if init not in ("equal", "best", "both"):
        raise KitError(f"blend config: init must be 'equal', 'best' or 'both', got {init!r}")
    starts = []
    if init in ("equal", "both"):
        starts.append(np.ones(P.shape[0]))
    if init in ("best", "both"):
        singles = _score_batch(P, y, objective, eps)
        counts = np.zeros(P.shape[0])
        counts[np.argsort(-singles, kind="stable")[:max(1, init_size)]] = 1
        starts.append(counts)
    return starts


def fit_weights(P, y, cfg: dict, objective: str, rng) -> np.ndarray:
    """Weights from the greedy search, bagged over bootstrap row resamples when ``bags > 0``."""
    kw = dict(objective=objective, iterations=int(cfg["iterations"]), init=cfg["init"],
              init_size=int(cfg["init_size"]), eps=float(cfg["eps"]))
    bags = int(cfg["bags"])
    if bags <= 0 or P.shape[0] == 1:
        return greedy_weights(P, y, **kw)[0]
    n = P.shape[1]
    bagged = np.mean([greedy_weights(P[:, idx], y[idx], **kw)[0]
                      for idx in (rng.integers(0, n, n) for _ in range(bags))], axis=0)
    # Never worse than where the paths start, on the rows the weights are fitted on.
    starts = [c / c.sum() for c in _start_counts(P, y, objective, cfg["init"],
                                                 int(cfg["init_size"]), float(cfg["eps"]))]
    scores = _score_batch(np.tensordot(np.stack([bagged] + starts), P, axes=1), y, objective,
                          float(cfg["eps"]))
    return ([bagged] + starts)[int(np.argmax(scores))]


def bias_grid(cfg: dict) -> np.ndarray:
    grid = np.linspace(float(cfg["bias_low"]), float(cfg["bias_high"]), int(cfg["bias_steps"]))
    return np.round(grid, 10)


def weighted_macro_f1_batch(pred: np.ndarray, y: np.ndarray, class_weight: np.ndarray,
                            n_classes: int) -> np.ndarray:
    """:func:`~kit.metrics.macro_f1_batch` with each row counted ``class_weight[y]`` times:
    the expected macro F1 on a set whose class mix is the rows' mix times ``class_weight``."""
    pred = np.atleast_2d(pred)
    g = pred.shape[0]
    w = np.broadcast_to(np.asarray(class_weight, np.float64)[y], pred.shape)
    cell = pred + n_classes * np.arange(g)[:, None]
    size = g * n_classes
    predicted = np.bincount(cell.ravel(), w.ravel(), minlength=size).reshape(g, n_classes)
    hit = pred == y[None, :]
    hits = np.bincount(cell[hit], w[hit], minlength=size).reshape(g, n_classes)
    denom = predicted + np.bincount(y, w[0], minlength=n_classes)[None, :]
    present = denom > 0
    f1 = np.divide(2.0 * hits, denom, out=np.zeros(denom.shape), where=present)
    return f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1)


def fit_biases(probs: np.ndarray, y: np.ndarray, cfg: dict,
               class_weight: np.ndarray | None = None) -> np.ndarray:
    """Per-class additive biases on ``log p`` maximising macro F1, by coordinate ascent.

    ``b[0]`` stays 0 (only differences matter). Each step tries every grid value for one
    class at once; among equal scores the value nearest 0 wins (no bias without evidence).
    Sweeps stop when one brings no gain or after ``bias_rounds``. ``class_weight`` (one per
    class) scores macro F1 as if each class's rows were that many times as frequent: biases
    for another class mix.
    """
    c = probs.shape[-1]
    logp = np.log(np.maximum(probs, float(cfg["eps"])))
    grid = bias_grid(cfg)
    b = np.zeros(c)
    if class_weight is None:
        def f1_batch(pred):
            return macro_f1_batch(pred, y, c)
    else:
        def f1_batch(pred):
            return weighted_macro_f1_batch(pred, y, class_weight, c)
    best = float(f1_batch(logp.argmax(axis=1)[None])[0])
    for _ in range(int(cfg["bias_rounds"])):
        gained = False
        for k in range(1, c):
            cand = np.broadcast_to(logp + b, (len(grid),) + logp.shape).copy()
            cand[:, :, k] = logp[None, :, k] + grid[:, None]
            scores = f1_batch(cand.argmax(axis=2))
            top = scores.max()
            ties = np.flatnonzero(scores >= top - 1e-12)
            b[k] = grid[ties[np.argmin(np.abs(grid[ties]))]]
            gained |= top > best + 1e-12
            best = max(best, float(top))
        if not gained:
            break
    return b


@dataclass
class Fitted:
    """Weights over the library and class biases from one fit (``prior``: the class mix of
    the rows it was applied to, with ``prior: em``)."""

    weights: np.ndarray
    biases: np.ndarray
    prior: "PriorRule | None" = None


@dataclass
class PriorRule:
    """The decision rule for one set of rows: their class mix (``mix``; ``train_mix`` that of
    the OOF labels the biases were fitted on), their probabilities adjusted to it and the
    biases for it; rule ``argmax(log probs + biases)``. With ``prior: train``, or ``em`` when
    EM's estimate (``estimate``) is not a significant shift, the mix is the OOF labels' and
    probabilities and biases are the fitted ones, unchanged."""

    mode: str
    mix: np.ndarray
    train_mix: np.ndarray
    probs: np.ndarray
    biases: np.ndarray
    estimate: MixEstimate | None = None

    @property
    def n_iter(self) -> int:
        return self.estimate.n_iter if self.estimate is not None else 0


def prior_rule(fit_probs: np.ndarray, y: np.ndarray, biases: np.ndarray, probs: np.ndarray,
               cfg: dict) -> PriorRule:
    """The rule for the rows ``probs`` of a blend fitted on ``fit_probs`` (labels ``y``, class
    biases ``biases``), for the class mix ``cfg["prior"]`` says.

    ``em``: estimate the rows' mix (:func:`kit.ensemble.prior.estimate_mix`); when its
    likelihood-ratio test rejects the OOF mix at ``em_alpha``, adjust ``probs`` to it and
    refit the biases on ``fit_probs`` adjusted the same way, each row weighted by
    ``mix / train_mix`` of its class; else keep everything as fitted. Measured: keeping the
    training mix's biases on the adjusted probabilities loses macro F1 even with the true
    mix, since the adjustment alone gives the rule best for accuracy, not for macro F1.
    """
    mode = cfg.get("prior", "train")
    train_mix = class_mix(y, fit_probs.shape[-1])
    if mode == "train":
        return PriorRule(mode, train_mix, train_mix, probs, biases)
    est = estimate_mix(fit_probs, y, probs, float(cfg["eps"]), tol=float(cfg["em_tol"]),
                       max_iter=int(cfg["em_max_iter"]), alpha=float(cfg["em_alpha"]))
    if not est.shifted:
        return PriorRule(mode, train_mix, train_mix, probs, biases, est)
    mix = est.mix
    adjusted = adjust_to_prior(probs, train_mix, mix)
    if cfg.get("biases", True):
        biases = fit_biases(adjust_to_prior(fit_probs, train_mix, mix), y, cfg,
                            class_weight=mix / train_mix)
    else:
        biases = np.zeros(probs.shape[-1])
    return PriorRule(mode, mix, train_mix, adjusted, biases, est)


def fit_params(P, y, cfg: dict, objective: str, rng) -> Fitted:
    """Weights, then (unless ``biases: false``) biases on the weighted blend of the same rows."""
    w = fit_weights(P, y, cfg, objective, rng)
    if not cfg.get("biases", True):
        return Fitted(w, np.zeros(P.shape[-1]))
    return Fitted(w, fit_biases(np.tensordot(w, P, axes=1), y, cfg))


@dataclass
class SearchResult:
    """Fit on all OOF rows, nested predictions and baselines (no file names)."""

    fitted: Fitted
    oof_probs: np.ndarray            # N x C, in-sample weights
    pred_in_sample: np.ndarray
    pred_in_sample_no_bias: np.ndarray
    nested_probs: np.ndarray         # N x C, each fold blended with weights fitted without it
    pred_nested: np.ndarray
    pred_nested_no_bias: np.ndarray
    fold_fits: dict[int, Fitted]
    scores: dict = field(default_factory=dict)


class BlendSearch(BaseEstimator):
    """Weights and class biases for a blend, fitted as a scikit-learn estimator would be.

    ``fit`` runs the weight search and then the bias search on all rows, and the same pair
    once per fold on the other folds' rows (the nested fits, applied to the held-out fold);
    ``predict_proba`` / ``predict`` apply the weights and the rule ``argmax(log p + b)``.
    The constructor only stores its arguments; they are checked and resolved by ``fit``.

    Parameters
    ----------
    objective : {"f1", "logloss"}, default="f1"
        What the weight search maximises: macro F1 of the argmax, or minus the log-loss.
        The biases always maximise macro F1.
    cfg : dict or None, default=None
        The resolved ``blend`` config (``kit.config.load_config("blend", overrides)``:
        ``iterations``, ``init``, ``init_size``, ``bags``, ``biases``, ``bias_*``, ``eps``,
        ``prior``, ``em_*``). Required by ``fit`` (None is refused there: the estimator
        reads no YAML).
    random_state : int, numpy.random.Generator or None, default=None
        Seeds the bootstrap bags (used only when ``bags > 0``): it is split into one child
        generator for the fit on all rows and one per fold, so the same value gives the
        same fit. None: fresh entropy.

    Attributes
    ----------
    cfg_ : dict
        The resolved config the fit used.
    n_models_ : int
        Library models M seen in ``fit``.
    n_classes_ : int
        Classes C seen in ``fit``.
    models_ : list of str
        The library models' names (``models`` given to ``fit``, else ``m0``, ``m1``...).
    weights_ : ndarray of shape (M,)
        Non-negative weights summing to 1, fitted on all rows.
    biases_ : ndarray of shape (C,)
        Additive biases on ``log p`` (``biases_[0] == 0``; all 0 with ``biases: false``),
        for the OOF rows' class mix.
    train_prior_ : ndarray of shape (C,)
        The class mix of the OOF labels.
    y_ : ndarray of shape (N,)
        The OOF labels (``prior: em`` refits the biases on them for another mix).
    oof_proba_ : ndarray of shape (N, C)
        The fitted rows blended with ``weights_`` (in-sample).
    in_sample_pred_ : ndarray of shape (N,)
        ``predict`` on the fitted rows: optimistic, they chose the weights and biases.
    fold_fits_ : dict of int to Fitted
        Per fold k: the weights and biases fitted on the rows of the other folds.
    nested_proba_ : ndarray of shape (N, C)
        Each fold's rows blended with the weights fitted without them (with ``prior: em``,
        adjusted to the class mix EM finds in that fold).
    nested_pred_ : ndarray of shape (N,)
        Each fold's rows predicted by the fit without them: the honest predictions.
    scores_ : dict
        ``nested`` and ``in_sample`` (``macro_f1``, ``macro_f1_no_bias``, ``per_class_f1``,
        ``ci95`` and ``ci95_no_bias``: 95 % bootstrap intervals over images, ``bias_gain``:
        paired bootstrap of with minus without biases; nested also ``per_fold``), ``gap``
        (in-sample minus nested) and ``baselines`` (``equal_weights``, ``best_single``, each
        with ``ci95``; ``singles``).
    result_ : SearchResult
        The same fit as one record (what :mod:`kit.ensemble.blend` writes).

    Examples
    --------
    >>> est = BlendSearch(objective="f1", random_state=42).fit(P_oof, y, folds)
    >>> est.scores_["nested"]["macro_f1"]          # the expected score
    >>> labels = est.predict(P_test)               # class indices, one per test row
    """

    def __init__(self, objective: str = "f1", cfg: dict | None = None, random_state=None):
        self.objective = objective
        self.cfg = cfg
        self.random_state = random_state

    def fit(self, P, y, folds, models=None) -> "BlendSearch":
        """Fit weights and biases on all rows, and once per fold for the nested predictions.

        Parameters
        ----------
        P : array-like of shape (M, N, C)
            OOF probabilities of the M library models (rows sum to 1).
        y : array-like of shape (N,)
            Class indices in ``0..C-1``.
        folds : array-like of shape (N,)
            Fold number of each row; each fold is held out once for the nested fits.
        models : list of str, optional
            Names of the M models, used in ``scores_`` (default ``m0``, ``m1``...).

        Returns
        -------
        self : BlendSearch
            The fitted estimator.

        Raises
        ------
        KitError
            An unknown ``objective`` or config key.
        ValueError
            Arrays of inconsistent shapes.
        """
        if self.objective not in OBJECTIVES:
            raise KitError(f"objective must be one of {', '.join(OBJECTIVES)}, "
                           f"got {self.objective!r}")
        cfg = given(self.cfg, "blend")
        if cfg.get("prior", "train") not in PRIORS:
            raise KitError(f"blend config: prior must be one of {', '.join(PRIORS)}, "
                           f"got {cfg['prior']!r}")
        P, y, folds = np.asarray(P), np.asarray(y), np.asarray(folds)
        if P.ndim != 3:
            raise ValueError(f"P must be M x N x C (models x rows x classes), got shape {P.shape}")
        if y.shape != (P.shape[1],) or folds.shape != (P.shape[1],):
            raise ValueError(f"y {y.shape} and folds {folds.shape} must be ({P.shape[1]},), "
                             f"one per row of P {P.shape}")
        models = list(models) if models else [f"m{i}" for i in range(len(P))]
        if len(models) != len(P):
            raise ValueError(f"{len(models)} model names for {len(P)} models in P")
        eps = float(cfg["eps"])
        fold_ids = np.unique(folds)
        rngs = check_random_state(self.random_state).spawn(len(fold_ids) + 1)
        full = fit_params(P, y, cfg, self.objective, rngs[0])
        oof = np.tensordot(full.weights, P, axes=1)
        nested = np.zeros_like(oof)
        nested_pred = np.zeros(len(y), dtype=np.int64)
        fold_fits = {}
        for k, rng in zip(fold_ids, rngs[1:]):
            train, held = folds != k, folds == k
            fit = fit_params(P[:, train], y[train], cfg, self.objective, rng)
            rule = prior_rule(np.tensordot(fit.weights, P[:, train], axes=1), y[train],
                              fit.biases, np.tensordot(fit.weights, P[:, held], axes=1), cfg)
            nested[held] = rule.probs
            nested_pred[held] = apply_rule(rule.probs, rule.biases, eps)
            if rule.mode != "train":
                fit.prior = rule
            fold_fits[int(k)] = fit
        res = SearchResult(fitted=full, oof_probs=oof,
                           pred_in_sample=apply_rule(oof, full.biases, eps),
                           pred_in_sample_no_bias=oof.argmax(axis=1), nested_probs=nested,
                           pred_nested=nested_pred, pred_nested_no_bias=nested.argmax(axis=1),
                           fold_fits=fold_fits)
        res.scores = _scores(res, P, y, folds, models)
        self.cfg_ = cfg
        self.n_models_, self.n_classes_ = P.shape[0], P.shape[2]
        self.models_ = models
        self.weights_, self.biases_ = full.weights, full.biases
        self.y_, self.train_prior_ = y, class_mix(y, P.shape[2])
        self.oof_proba_, self.in_sample_pred_ = res.oof_probs, res.pred_in_sample
        self.fold_fits_ = fold_fits
        self.nested_proba_, self.nested_pred_ = res.nested_probs, res.pred_nested
        self.scores_ = res.scores
        self.result_ = res
        return self

    def prior_rule(self, P) -> PriorRule:
        """The rule for the rows of ``P``: the blend ``sum_m weights_[m] * P[m]``, with
        ``prior: em`` adjusted to the class mix EM estimates from those rows, and the class
        biases for that mix (:func:`prior_rule`).

        Parameters
        ----------
        P : array-like of shape (M, T, C)
            Probabilities of the same M models, in the order given to ``fit``.

        Returns
        -------
        PriorRule
        """
        check_is_fitted(self)
        P = np.asarray(P)
        if P.ndim != 3 or P.shape[0] != self.n_models_ or P.shape[2] != self.n_classes_:
            raise ValueError(f"P must be {self.n_models_} x T x {self.n_classes_} (the models "
                             f"and classes seen in fit), got shape {P.shape}")
        return prior_rule(self.oof_proba_, self.y_, self.biases_,
                          np.tensordot(self.weights_, P, axes=1), self.cfg_)

    def predict_proba(self, P) -> np.ndarray:
        """The blend ``sum_m weights_[m] * P[m]`` of the library models' probabilities
        (``prior: em``: adjusted to the class mix of these rows).

        Parameters
        ----------
        P : array-like of shape (M, T, C)
            Probabilities of the same M models, in the order given to ``fit``.

        Returns
        -------
        ndarray of shape (T, C)
            Blended probabilities (rows sum to 1 when each model's do).
        """
        return self.prior_rule(P).probs

    def predict(self, P) -> np.ndarray:
        """Class indices ``argmax(log(predict_proba(P)) + biases)`` (``biases_``, or with
        ``prior: em`` the biases refitted for the rows' class mix).

        Parameters
        ----------
        P : array-like of shape (M, T, C)
            Probabilities of the same M models, in the order given to ``fit``.

        Returns
        -------
        ndarray of shape (T,)
            Class indices in ``0..C-1``.
        """
        rule = self.prior_rule(P)
        return apply_rule(rule.probs, rule.biases, float(self.cfg_["eps"]))

    def score(self, P, y) -> float:
        """Macro F1 of ``predict(P)`` against ``y`` (in-sample when ``P`` is the fitted rows).

        Parameters
        ----------
        P : array-like of shape (M, T, C)
        y : array-like of shape (T,)

        Returns
        -------
        float
        """
        return float(macro_f1(np.asarray(y), self.predict(P)))


def search(P: np.ndarray, y: np.ndarray, folds: np.ndarray, cfg: dict, objective: str = "f1",
           seed=42, models=None) -> SearchResult:
    """The whole blend fit on arrays, as one record: ``BlendSearch(...).fit(...).result_``.

    Parameters
    ----------
    P : ndarray of shape (M, N, C)
        OOF probabilities of the library models.
    y, folds : ndarray of shape (N,)
        Class indices and fold numbers.
    cfg : dict
        The resolved ``blend`` config.
    objective : {"f1", "logloss"}
    seed : int, numpy.random.Generator or None
        ``random_state`` of the estimator.
    models : list of str, optional
        Names of the models for ``scores["baselines"]``.
    """
    return BlendSearch(objective, cfg, seed).fit(P, y, folds, models=models).result_


def _scores(res: SearchResult, P, y, folds, models) -> dict:
    # One seeded bootstrap over images for every interval (kit.metrics' defaults), so the
    # intervals of the blend and of each stage's scores are drawn alike.
    def ci(pred):
        return list(bootstrap_ci(y, pred, num_classes=P.shape[2]))

    def block(pred, pred_no_bias):
        gain = paired_bootstrap(y, pred_no_bias, pred, num_classes=P.shape[2])
        return {"macro_f1": macro_f1(y, pred), "macro_f1_no_bias": macro_f1(y, pred_no_bias),
                "ci95": ci(pred), "ci95_no_bias": ci(pred_no_bias),
                "bias_gain": {k: gain[k] for k in ("diff", "ci95", "p_b_better")},
                "per_class_f1": dict(zip(CLASSES, map(float, per_class_f1(y, pred))))}

    singles = {m: macro_f1(y, P[i].argmax(axis=1)) for i, m in enumerate(models)}
    best = max(singles, key=lambda m: (singles[m], -models.index(m)))
    nested = block(res.pred_nested, res.pred_nested_no_bias)
    nested["per_fold"] = {int(k): macro_f1(y[folds == k], res.pred_nested[folds == k])
                          for k in np.unique(folds)}
    in_sample = block(res.pred_in_sample, res.pred_in_sample_no_bias)
    equal = P.mean(axis=0).argmax(axis=1)
    return {
        "nested": nested,
        "in_sample": in_sample,
        "gap": in_sample["macro_f1"] - nested["macro_f1"],
        "baselines": {"equal_weights": {"macro_f1": macro_f1(y, equal), "ci95": ci(equal)},
                      "best_single": {"model": best, "macro_f1": singles[best],
                                      "ci95": ci(P[models.index(best)].argmax(axis=1))},
                      "singles": singles},
    }
