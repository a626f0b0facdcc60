"""The blend's searches on arrays: weight search, class biases, nested honesty, determinism,
and BlendSearch's estimator contract (constructor stores only, fit returns self, ...)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from kit.bench.blend import synthetic_problem
from kit.config import load_config
from kit.ensemble.biases import apply_rule, fit_biases
from kit.ensemble.search import BlendSearch, fit_params
from kit.ensemble.weights import greedy_weights
from kit.metrics import macro_f1, macro_f1_batch
from kit.utils import KitError


@pytest.fixture
def cfg():
    return load_config("blend")


def test_macro_f1_batch_matches_kit_metrics():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    preds = rng.integers(0, 4, (20, 60))
    preds[3] = 0                      # one class predicted only
    preds[4] = np.where(y == 3, 2, y)  # a class never predicted
    got = macro_f1_batch(preds, y, 4)
    assert np.allclose(got, [macro_f1(y, p) for p in preds])


@pytest.mark.parametrize("seed", range(4))
def test_weight_search_beats_or_equals_equal_weights_in_sample(cfg, seed):
    p = synthetic_problem(300, 3, seed=seed)
    weights, score = greedy_weights(p["oof"], p["y"], "f1", iterations=40)
    equal = macro_f1(p["y"], p["oof"].mean(axis=0).argmax(axis=1))
    assert np.all(weights >= 0) and weights.sum() == pytest.approx(1.0)
    assert score == pytest.approx(macro_f1(p["y"], np.tensordot(weights, p["oof"], 1).argmax(1)))
    best_single = max(macro_f1(p["y"], q.argmax(axis=1)) for q in p["oof"])
    assert score >= max(equal, best_single) - 1e-12
    res = BlendSearch("f1", cfg, seed).fit(p["oof"], p["y"], p["folds"]).result_
    base = res.scores["baselines"]
    assert res.scores["in_sample"]["macro_f1_no_bias"] >= max(
        base["equal_weights"]["macro_f1"], base["best_single"]["macro_f1"]) - 1e-12
    for init in ("equal", "best"):  # each start alone keeps its own guarantee
        w, sc = greedy_weights(p["oof"], p["y"], "f1", iterations=10, init=init)
        assert sc >= (equal if init == "equal" else best_single) - 1e-12


def test_weight_search_moves_weight_off_a_useless_model(cfg):
    p = synthetic_problem(400, 2, seed=3, signal=(1.5, 1.5))
    noise = np.random.default_rng(0).dirichlet(np.ones(4), size=400)
    P = np.concatenate([p["oof"], noise[None]])
    weights, score = greedy_weights(P, p["y"], "f1", iterations=40)
    assert weights[2] < 1 / 3
    assert score > macro_f1(p["y"], P.mean(axis=0).argmax(axis=1))


def test_logloss_objective_lowers_log_loss(cfg):
    p = synthetic_problem(300, 3, seed=1)

    def logloss(w):
        q = np.tensordot(w, p["oof"], 1)[np.arange(300), p["y"]]
        return -np.mean(np.log(q))

    weights, _ = greedy_weights(p["oof"], p["y"], "logloss", iterations=40)
    assert logloss(weights) <= logloss(np.ones(3) / 3)
    res = BlendSearch("logloss", cfg, 42).fit(p["oof"], p["y"], p["folds"]).result_
    assert res.fitted.weights.sum() == pytest.approx(1.0)


def test_bias_tuning_raises_macro_f1_where_argmax_is_poor(cfg):
    # The minority class's probability is under-scaled 8x: argmax almost never predicts it.
    p = synthetic_problem(581, 1, seed=5, minority_scale=0.12, signal=(2.0,))
    probs, y = p["oof"][0], p["y"]
    before = macro_f1(y, probs.argmax(axis=1))
    b = fit_biases(probs, y, cfg)
    after = macro_f1(y, apply_rule(probs, b, cfg["eps"]))
    assert b[0] == 0
    assert b[3] > 0.5 and b[3] == b.max()  # the biases favour the minority class
    assert after > before + 0.05
    # ... and the gain holds on rows the biases never saw (nested).
    res = BlendSearch("f1", cfg, 42).fit(p["oof"], y, p["folds"]).result_
    assert res.scores["nested"]["macro_f1"] > res.scores["nested"]["macro_f1_no_bias"] + 0.02


def test_bias_search_keeps_zero_when_nothing_to_gain(cfg):
    y = np.repeat(np.arange(4), 10)
    probs = np.full((40, 4), 0.1)
    probs[np.arange(40), y] = 0.7          # argmax is already perfect
    assert np.all(fit_biases(probs, y, cfg) == 0)


def test_nested_score_is_reported_and_honest(cfg):
    # biases: true (auto picks between two rules on all the nested rows: recorded as such).
    cfg = {**cfg, "biases": True}
    p = synthetic_problem(300, 3, seed=2)
    res = BlendSearch("f1", cfg, 7).fit(p["oof"], p["y"], p["folds"]).result_
    s = res.scores
    assert s["nested"]["macro_f1"] == pytest.approx(macro_f1(p["y"], res.pred_nested))
    assert s["nested"]["macro_f1"] != pytest.approx(s["in_sample"]["macro_f1"])
    assert s["gap"] == pytest.approx(s["in_sample"]["macro_f1"] - s["nested"]["macro_f1"])
    # Held-out fold predictions never depend on that fold's labels: scramble them and refit.
    k = 0
    held = p["folds"] == k
    y2 = p["y"].copy()
    y2[held] = np.random.default_rng(0).permutation(4)[y2[held]]
    res2 = BlendSearch("f1", cfg, 7).fit(p["oof"], y2, p["folds"]).result_
    assert np.array_equal(res.pred_nested[held], res2.pred_nested[held])
    # ... and they are what a fit on the other folds predicts.
    fit = fit_params(p["oof"][:, ~held], p["y"][~held], cfg, "f1", None)
    expect = apply_rule(np.tensordot(fit.weights, p["oof"][:, held], 1), fit.biases, cfg["eps"])
    assert np.array_equal(res.pred_nested[held], expect)


def test_search_is_deterministic_with_bags(cfg):
    p = synthetic_problem(200, 3, seed=4)
    bagged = {**cfg, "bags": 5}
    a = BlendSearch("f1", bagged, 1).fit(p["oof"], p["y"], p["folds"]).result_
    b = BlendSearch("f1", bagged, 1).fit(p["oof"], p["y"], p["folds"]).result_
    assert np.array_equal(a.fitted.weights, b.fitted.weights)
    assert np.array_equal(a.pred_nested, b.pred_nested)


# ----------------------------------------------------------------------------- estimator

def test_constructor_only_stores_its_arguments():
    overrides = {"not_a_key": 1}
    est = BlendSearch(objective="nope", cfg=overrides, random_state=3)  # nothing checked yet
    assert vars(est) == {"objective": "nope", "cfg": overrides, "random_state": 3}
    assert est.cfg is overrides
    assert est.get_params() == {"objective": "nope", "cfg": overrides, "random_state": 3}
    assert "objective='nope'" in repr(est)
    p = synthetic_problem(60, 2, seed=0)
    with pytest.raises(KitError, match="objective must be one of f1, logloss"):
        est.fit(p["oof"], p["y"], p["folds"])
    with pytest.raises(KitError, match="takes its resolved config"):  # it reads no YAML itself
        est.set_params(objective="f1", cfg=None).fit(p["oof"], p["y"], p["folds"])
    assert not [k for k in vars(est) if k.endswith("_")]  # a failed fit leaves no attributes


def test_fit_returns_self_and_sets_fitted_attributes(cfg):
    p = synthetic_problem(200, 3, seed=6)
    est = BlendSearch(random_state=5, cfg=load_config("blend"))
    assert est.fit(p["oof"], p["y"], p["folds"], models=["a", "b", "c"]) is est
    assert est.cfg_ == cfg and est.cfg == cfg
    assert (est.n_models_, est.n_classes_, est.models_) == (3, 4, ["a", "b", "c"])
    assert est.weights_.shape == (3,) and est.weights_.sum() == pytest.approx(1.0)
    assert est.biases_.shape == (4,) and est.biases_[0] == 0
    assert sorted(est.fold_fits_) == sorted(np.unique(p["folds"]).tolist())
    assert est.nested_pred_.shape == est.in_sample_pred_.shape == (200,)
    assert est.scores_["nested"]["macro_f1"] == pytest.approx(macro_f1(p["y"], est.nested_pred_))
    assert set(est.scores_["baselines"]["singles"]) == {"a", "b", "c"}
    # predict/predict_proba on the fitted rows are the in-sample blend and predictions.
    assert np.array_equal(est.predict_proba(p["oof"]), est.oof_proba_)
    assert np.array_equal(est.predict(p["oof"]), est.in_sample_pred_)
    assert est.score(p["oof"], p["y"]) == pytest.approx(est.scores_["in_sample"]["macro_f1"])
    # ... and on new rows, the weights then the bias rule.
    test = est.predict_proba(p["test"])
    assert np.array_equal(test, np.tensordot(est.weights_, p["test"], axes=1))
    assert np.array_equal(est.predict(p["test"]), apply_rule(test, est.biases_, cfg["eps"]))
    # The functional API is the same fit.
    res = BlendSearch("f1", cfg, 5).fit(p["oof"], p["y"], p["folds"],
                                        models=["a", "b", "c"]).result_
    assert np.array_equal(res.fitted.weights, est.weights_)
    assert np.array_equal(res.pred_nested, est.nested_pred_)
    assert res.scores == est.scores_


def test_predict_before_fit_raises_a_clear_error():
    p = synthetic_problem(60, 2, seed=0)
    for method in ("predict", "predict_proba"):
        with pytest.raises(NotFittedError, match="not fitted yet. Call 'fit'"):
            getattr(BlendSearch(cfg=load_config("blend")), method)(p["test"])


def test_predict_refuses_other_models_or_classes():
    p = synthetic_problem(100, 3, seed=1)
    est = BlendSearch(cfg=load_config("blend")).fit(p["oof"], p["y"], p["folds"])
    with pytest.raises(ValueError, match="must be 3 x T x 4"):
        est.predict(p["test"][:2])
    with pytest.raises(ValueError, match="must be 3 x T x 4"):
        est.predict_proba(p["test"][0])
    with pytest.raises(ValueError, match="one per row"):
        BlendSearch(cfg=load_config("blend")).fit(p["oof"], p["y"][:-1], p["folds"])


def test_same_random_state_same_result(cfg):
    p = synthetic_problem(200, 3, seed=4)
    bagged = {"bags": 5}

    def fit(rs):
        return BlendSearch(cfg=load_config("blend", bagged), random_state=rs).fit(
            p["oof"], p["y"], p["folds"])

    a, b = fit(11), fit(11)
    c = fit(np.random.default_rng(11))  # a Generator seeded alike draws the same bags
    for other in (b, c):
        assert np.array_equal(a.weights_, other.weights_)
        assert np.array_equal(a.biases_, other.biases_)
        assert np.array_equal(a.nested_proba_, other.nested_proba_)
        assert all(np.array_equal(a.fold_fits_[k].weights, other.fold_fits_[k].weights)
                   for k in a.fold_fits_)
    # A refit of the same estimator, and a clone of it, give the same result too.
    assert np.array_equal(a.fit(p["oof"], p["y"], p["folds"]).weights_, b.weights_)
    twin = clone(a)
    assert not hasattr(twin, "weights_") and twin.get_params() == a.get_params()
    assert np.array_equal(twin.fit(p["oof"], p["y"], p["folds"]).nested_pred_, b.nested_pred_)


def test_biases_off_gives_plain_argmax():
    p = synthetic_problem(150, 2, seed=3)
    est = BlendSearch(cfg=load_config("blend", {"biases": False})).fit(p["oof"], p["y"], p["folds"])
    assert np.all(est.biases_ == 0)
    assert np.array_equal(est.predict(p["test"]), est.predict_proba(p["test"]).argmax(axis=1))


def test_biases_auto_keeps_them_only_for_a_positive_nested_gain():
    from blend_data import shifted_problem

    # Built to need them: auto keeps the biases, as true does.
    need = shifted_problem(n=600, seed=1)
    auto = BlendSearch("f1", load_config("blend", {"biases": "auto", "iterations": 5}), 0).fit(
        need["oof"], need["y"], need["folds"])
    choice = auto.scores_["biases_choice"]
    assert choice["applied"] and choice["nested_gain"] > 0 and np.any(auto.biases_ != 0)
    # Nothing to correct (no shifted class, scale 1): whenever the nested gain is not
    # positive, the blend is the one without biases, and says so.
    for seed in range(4):
        p = shifted_problem(n=300, seed=seed, scale=1.0)
        est = BlendSearch("f1", load_config("blend", {"biases": "auto", "iterations": 5}),
                          0).fit(p["oof"], p["y"], p["folds"])
        choice = est.scores_["biases_choice"]
        assert choice["applied"] == (choice["nested_gain"] > 0)
        if not choice["applied"]:
            assert not np.any(est.biases_) and np.array_equal(
                est.nested_pred_, est.nested_proba_.argmax(axis=1))
