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
  the task's metric (``metric`` given to ``fit``: macro F1 for AN2DL; piecewise constant in
  the weights) directly; ``objective="logloss"`` optimises log-loss instead. Optionally
  bagged over bootstrap resamples of the rows (:mod:`kit.ensemble.weights`).
- **class biases**: the decision rule is ``argmax(log p + b)`` with ``b[0] = 0``; each other
  ``b[c]`` is tuned by coordinate ascent over a grid, for the task's metric. Macro F1 and
  balanced accuracy reward recall on small classes that plain argmax under-predicts; the
  gain is measured and printed (:mod:`kit.ensemble.biases`).
- **honesty**: the whole fit (weights and biases) is repeated once per fold on the other
  folds' rows and applied to the held-out fold; the concatenated held-out predictions give
  the *nested* score, the submission's expected score. The in-sample score is reported
  beside it, labelled optimistic. Every score comes with its 95 % bootstrap interval over
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

from kit.config import given
from kit.ensemble.biases import apply_rule, fit_biases
from kit.ensemble.prior import PRIORS, MixEstimate, adjust_to_prior, class_mix, estimate_mix
from kit.ensemble.weights import fit_weights
from kit.metrics import bootstrap_ci, get_metric, macro_f1, paired_bootstrap, per_class_f1
from kit.utils import KitError, check_random_state

# "f1" and "metric" both mean the task's metric ("f1" dates from when that was macro F1).
OBJECTIVES = ("f1", "logloss", "metric")


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
               cfg: dict, metric: str = "macro_f1") -> PriorRule:
    """The rule for the rows ``probs`` of a blend fitted on ``fit_probs`` (labels ``y``, class
    biases ``biases``), for the class mix ``cfg["prior"]`` says.

    ``em``: estimate the rows' mix (:func:`kit.ensemble.prior.estimate_mix`); when its
    likelihood-ratio test rejects the OOF mix at ``em_alpha``, adjust ``probs`` to it and
    refit the biases on ``fit_probs`` adjusted the same way, each row weighted by
    ``mix / train_mix`` of its class (for ``metric``: every metric a task may name is a
    function of the confusion matrix, so reweighting rows fits any of them); else keep
    everything as fitted. Measured: keeping the training mix's biases on the adjusted
    probabilities loses macro F1 even with the true mix, since the adjustment alone gives the
    rule best for accuracy, not for macro F1.
    """
    mode = cfg["prior"]
    train_mix = class_mix(y, fit_probs.shape[-1])
    if mode == "train":
        return PriorRule(mode, train_mix, train_mix, probs, biases)
    est = estimate_mix(fit_probs, y, probs, float(cfg["eps"]), tol=float(cfg["em_tol"]),
                       max_iter=int(cfg["em_max_iter"]), alpha=float(cfg["em_alpha"]))
    if not est.shifted:
        return PriorRule(mode, train_mix, train_mix, probs, biases, est)
    mix = est.mix
    adjusted = adjust_to_prior(probs, train_mix, mix)
    if cfg["biases"]:
        biases = fit_biases(adjust_to_prior(fit_probs, train_mix, mix), y, cfg,
                            class_weight=mix / train_mix, metric=metric)
    else:
        biases = np.zeros(probs.shape[-1])
    return PriorRule(mode, mix, train_mix, adjusted, biases, est)


def fit_params(P, y, cfg: dict, objective: str, rng, metric: str = "macro_f1") -> Fitted:
    """Weights, then (unless ``biases: false``) biases on the weighted blend of the same rows,
    both for ``metric`` (the weights for log-loss with ``objective="logloss"``)."""
    w = fit_weights(P, y, cfg, objective, rng, metric)
    if not cfg["biases"]:
        return Fitted(w, np.zeros(P.shape[-1]))
    return Fitted(w, fit_biases(np.tensordot(w, P, axes=1), y, cfg, metric=metric))


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
    objective : {"f1", "metric", "logloss"}, default="f1"
        What the weight search maximises: the metric of the argmax (``f1`` and ``metric``
        alike: the ``metric`` given to ``fit``), or minus the log-loss. The biases always
        maximise the metric.
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
    metric_ : str
        The metric the fit scored and searched for (``metric`` given to ``fit``).
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
        ``metric`` (its name); ``nested`` and ``in_sample`` (``score`` and ``score_no_bias``:
        the metric with and without the biases, ``ci95`` and ``ci95_no_bias``: their 95 %
        bootstrap intervals over images, ``bias_gain``: paired bootstrap of with minus
        without biases; ``macro_f1``, ``macro_f1_no_bias`` and ``per_class_f1`` whatever the
        metric; nested also ``per_fold``, in the metric), ``gap`` (in-sample minus nested)
        and ``baselines`` (``equal_weights``, ``best_single``, each with ``score``,
        ``macro_f1`` and ``ci95``; ``singles``: the metric of each model).
    result_ : SearchResult
        The same fit as one record (what :mod:`kit.ensemble.blend` writes).

    Examples
    --------
    >>> est = BlendSearch("f1", load_config("blend"), 42).fit(P_oof, y, folds,
    ...                                                      metric="balanced_accuracy")
    >>> est.scores_["nested"]["score"]             # the expected balanced accuracy
    >>> labels = est.predict(P_test)               # class indices, one per test row
    """

    def __init__(self, objective: str = "f1", cfg: dict | None = None, random_state=None):
        self.objective = objective
        self.cfg = cfg
        self.random_state = random_state

    def fit(self, P, y, folds, models=None, metric: str = "macro_f1",
            classes=None) -> "BlendSearch":
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
        metric : str, default="macro_f1"
            The task's metric (a name of :data:`kit.metrics.METRICS`): what the weights
            (objective ``f1``/``metric``) and the biases are fitted for and every score is.
            A property of the data, like ``y``, hence a ``fit`` argument.
        classes : list of str, optional
            Names of the C classes, the keys of ``per_class_f1`` in ``scores_`` (default
            ``0``, ``1``...).

        Returns
        -------
        self : BlendSearch
            The fitted estimator.

        Raises
        ------
        KitError
            An unknown ``objective``, ``metric`` or config key.
        ValueError
            Arrays of inconsistent shapes.
        """
        if self.objective not in OBJECTIVES:
            raise KitError(f"objective must be one of {', '.join(OBJECTIVES)}, "
                           f"got {self.objective!r}")
        cfg = given(self.cfg, "blend")
        metric = get_metric(metric).name
        if cfg["prior"] not in PRIORS:
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
        res = _fit_rows(P, y, folds, cfg, self.objective, self.random_state, metric)
        names = [str(c) for c in classes] if classes is not None else [
            str(k) for k in range(P.shape[2])]
        if len(names) != P.shape[2]:
            raise ValueError(f"{len(names)} class names for {P.shape[2]} classes in P")
        res.scores = _scores(res, P, y, folds, models, metric, names)
        if cfg["biases"] == "auto":
            # Applied only when they raise the nested score (paired, same rows); otherwise the
            # blend is refitted without them. The nested score reported is the chosen rule's:
            # a choice between two made on those rows, recorded as such.
            gain = res.scores["nested"]["bias_gain"]
            if gain["diff"] <= 0:
                res = _fit_rows(P, y, folds, {**cfg, "biases": False}, self.objective,
                                self.random_state, metric)
                res.scores = _scores(res, P, y, folds, models, metric, names)
            res.scores["biases_choice"] = {
                "mode": "auto", "applied": bool(gain["diff"] > 0),
                "nested_gain": float(gain["diff"]), "nested_gain_ci95": gain["ci95"],
                "note": "biases: auto chose between the blend with and without class biases "
                        "by their nested paired gain: the nested score is of the chosen one"}
        full, fold_fits = res.fitted, res.fold_fits
        self.cfg_, self.metric_ = cfg, metric
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
                          np.tensordot(self.weights_, P, axes=1), self.cfg_, self.metric_)

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
        """The metric (``metric_``) of ``predict(P)`` against ``y`` (in-sample when ``P`` is
        the fitted rows).

        Parameters
        ----------
        P : array-like of shape (M, T, C)
        y : array-like of shape (T,)

        Returns
        -------
        float
        """
        return _metric_of(self.metric_, np.asarray(y), self.predict(P), self.n_classes_)


def _metric_of(metric: str, y, pred, n_classes: int) -> float:
    """``metric`` of one prediction (class indices), by its reference form (scikit-learn's for
    macro F1, as the blend has always scored it)."""
    return get_metric(metric)(y, pred, tuple(range(n_classes)))



def _fit_rows(P, y, folds, cfg, objective, random_state, metric) -> SearchResult:
    """Weights and biases on all rows, and once per fold on the others (the nested fits)."""
    eps = float(cfg["eps"])
    fold_ids = np.unique(folds)
    rngs = check_random_state(random_state).spawn(len(fold_ids) + 1)
    full = fit_params(P, y, cfg, objective, rngs[0], metric)
    oof = np.tensordot(full.weights, P, axes=1)
    nested = np.zeros_like(oof)
    nested_pred = np.zeros(len(y), dtype=np.int64)
    fold_fits = {}
    for k, rng in zip(fold_ids, rngs[1:]):
        train, held = folds != k, folds == k
        fit = fit_params(P[:, train], y[train], cfg, objective, rng, metric)
        rule = prior_rule(np.tensordot(fit.weights, P[:, train], axes=1), y[train],
                          fit.biases, np.tensordot(fit.weights, P[:, held], axes=1), cfg,
                          metric)
        nested[held] = rule.probs
        nested_pred[held] = apply_rule(rule.probs, rule.biases, eps)
        if rule.mode != "train":
            fit.prior = rule
        fold_fits[int(k)] = fit
    return SearchResult(fitted=full, oof_probs=oof,
                        pred_in_sample=apply_rule(oof, full.biases, eps),
                        pred_in_sample_no_bias=oof.argmax(axis=1), nested_probs=nested,
                        pred_nested=nested_pred, pred_nested_no_bias=nested.argmax(axis=1),
                        fold_fits=fold_fits)


def _scores(res: SearchResult, P, y, folds, models, metric: str, classes: list[str]) -> dict:
    # One seeded bootstrap over images for every interval (kit.metrics' defaults), so the
    # intervals of the blend and of each stage's scores are drawn alike.
    c = P.shape[2]

    def score(pred, rows=slice(None)):
        return _metric_of(metric, y[rows], pred[rows], c)

    def ci(pred):
        return list(bootstrap_ci(y, pred, num_classes=c, metric=metric))

    def block(pred, pred_no_bias):
        gain = paired_bootstrap(y, pred_no_bias, pred, num_classes=c, metric=metric)
        return {"score": score(pred), "score_no_bias": score(pred_no_bias),
                "macro_f1": macro_f1(y, pred), "macro_f1_no_bias": macro_f1(y, pred_no_bias),
                "ci95": ci(pred), "ci95_no_bias": ci(pred_no_bias),
                "bias_gain": {k: gain[k] for k in ("diff", "ci95", "p_b_better")},
                "per_class_f1": dict(zip(classes, map(float, per_class_f1(y, pred, c))))}

    singles = {m: score(P[i].argmax(axis=1)) for i, m in enumerate(models)}
    best = max(singles, key=lambda m: (singles[m], -models.index(m)))
    nested = block(res.pred_nested, res.pred_nested_no_bias)
    nested["per_fold"] = {int(k): score(res.pred_nested, folds == k) for k in np.unique(folds)}
    in_sample = block(res.pred_in_sample, res.pred_in_sample_no_bias)
    equal = P.mean(axis=0).argmax(axis=1)
    best_pred = P[models.index(best)].argmax(axis=1)
    return {
        "metric": metric,
        "nested": nested,
        "in_sample": in_sample,
        "gap": in_sample["score"] - nested["score"],
        "baselines": {"equal_weights": {"score": score(equal), "macro_f1": macro_f1(y, equal),
                                        "ci95": ci(equal)},
                      "best_single": {"model": best, "score": singles[best],
                                      "macro_f1": macro_f1(y, best_pred), "ci95": ci(best_pred)},
                      "singles": singles},
    }
