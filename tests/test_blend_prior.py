"""The blend's class mix (prior: train | em: EM, calibration, biases for a mix) and the
intervals on its scores."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import check_grad

from kit.bench.blend import synthetic_problem
from kit.config import load_config
from kit.ensemble.biases import apply_rule, weighted_macro_f1_batch
from kit.ensemble.prior import (
    adjust_to_prior,
    calibrate,
    class_mix,
    em_prior,
    estimate_mix,
    fit_calibration,
    shift_test,
)
from kit.ensemble.search import BlendSearch
from kit.metrics import macro_f1, macro_f1_batch
from kit.utils import KitError

TRAIN_MIX = np.array([0.27, 0.35, 0.26, 0.12])


def calibrated_rows(mix, n, seed, train_mix=TRAIN_MIX):
    """Rows drawn with class mix ``mix`` and their exact posteriors under ``train_mix``.

    Each class is a unit-variance Gaussian in 2-D around its own centre, so the posterior is
    known in closed form: these probabilities are calibrated for ``train_mix`` by construction.
    """
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5], [1.5, 1.5]])
    y = rng.choice(4, size=n, p=np.asarray(mix) / np.sum(mix))
    x = centres[y] + rng.normal(size=(n, 2))
    loglik = -0.5 * ((x[:, None, :] - centres[None]) ** 2).sum(axis=2)
    post = np.exp(loglik - loglik.max(axis=1, keepdims=True)) * train_mix
    return post / post.sum(axis=1, keepdims=True), y


# ----------------------------------------------------------------------------- EM

def test_em_recovers_a_shifted_class_mix():
    shifted = np.array([0.10, 0.20, 0.30, 0.40])
    probs, y = calibrated_rows(shifted, 20000, seed=0)
    mix, n_iter = em_prior(probs, TRAIN_MIX)
    truth = class_mix(y, 4)
    assert mix.sum() == pytest.approx(1.0) and 1 < n_iter < 1000
    assert np.abs(mix - truth).max() < 0.02
    # the plain mean of the posteriors is pulled towards the training mix; EM undoes it
    assert np.abs(probs.mean(axis=0) - truth).sum() > 2 * np.abs(mix - truth).sum()


def test_em_keeps_the_training_mix_when_the_test_mix_is_the_same():
    probs, y = calibrated_rows(TRAIN_MIX, 20000, seed=1)
    mix, _ = em_prior(probs, TRAIN_MIX)
    assert np.abs(mix - TRAIN_MIX).max() < 0.02
    assert np.abs(mix - class_mix(y, 4)).max() < 0.02


def test_em_refuses_empty_rows_or_a_class_missing_from_training():
    probs, _ = calibrated_rows(TRAIN_MIX, 50, seed=2)
    with pytest.raises(KitError, match="no rows"):
        em_prior(probs[:0], TRAIN_MIX)
    with pytest.raises(KitError, match="a class has no rows in the training mix"):
        em_prior(probs, np.array([0.5, 0.5, 0.0, 0.0]))


def test_adjust_to_prior_reweights_and_renormalises():
    probs, _ = calibrated_rows(TRAIN_MIX, 100, seed=3)
    assert np.allclose(adjust_to_prior(probs, TRAIN_MIX, TRAIN_MIX), probs)
    out = adjust_to_prior(probs, TRAIN_MIX, np.array([0.1, 0.2, 0.3, 0.4]))
    assert np.allclose(out.sum(axis=1), 1)
    ratio = (out / probs) / (out / probs)[:, :1]
    assert np.allclose(ratio, (np.array([0.1, 0.2, 0.3, 0.4]) / TRAIN_MIX)
                       / (0.1 / TRAIN_MIX[0]))


def test_calibration_averages_to_the_label_mix_so_em_stays_put():
    # The generator's models under-predict the small class: EM on them alone sees a shift.
    p = synthetic_problem(581, 1, seed=4)
    probs, y = p["oof"][0], p["y"]
    mix = class_mix(y, 4)
    raw, _ = em_prior(probs, mix)
    theta = fit_calibration(probs, y)
    cal = calibrate(probs, theta)
    assert np.allclose(cal.mean(axis=0), mix, atol=1e-4)
    est = estimate_mix(probs, y, probs)
    assert np.abs(est.em - mix).max() < 1e-3 < np.abs(raw - mix).max()
    assert not est.shifted and est.p_value > 0.5 and np.array_equal(est.mix, mix)


def test_calibration_gradient_is_right():
    from kit.ensemble import prior

    p = synthetic_problem(200, 1, seed=5)
    logp = np.log(np.maximum(p["oof"][0], 1e-6))
    onehot = np.eye(4)[p["y"]]

    def nll(theta):
        z = prior._calibrated_logits(logp, theta)
        z = z - z.max(axis=1, keepdims=True)
        return -np.mean((onehot * z).sum(1) - np.log(np.exp(z).sum(1)))

    grads = {}

    def fake_minimize(fun, x0, **kw):  # capture the loss/gradient the fit hands to scipy
        grads["fun"] = fun
        return type("R", (), {"x": x0})()

    orig = prior.minimize
    prior.minimize = fake_minimize
    try:
        prior.fit_calibration(p["oof"][0], p["y"])
    finally:
        prior.minimize = orig
    theta = np.array([0.3, 0.2, -0.1, 0.4])
    assert grads["fun"](theta)[0] == pytest.approx(nll(theta))
    assert check_grad(lambda t: grads["fun"](t)[0], lambda t: grads["fun"](t)[1], theta) < 1e-5


# ----------------------------------------------------------------------------- weighted F1

def test_weighted_macro_f1_counts_each_row_its_class_weight_times():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 80)
    preds = rng.integers(0, 4, (6, 80))
    preds[1] = np.where(y == 3, 2, y)  # a class never predicted
    assert np.allclose(weighted_macro_f1_batch(preds, y, np.ones(4), 4),
                       macro_f1_batch(preds, y, 4))
    weight = np.array([2, 1, 3, 1])
    rows = np.repeat(np.arange(80), weight[y])  # the same rows, repeated
    assert np.allclose(weighted_macro_f1_batch(preds, y, weight.astype(float), 4),
                       macro_f1_batch(preds[:, rows], y[rows], 4))


# ----------------------------------------------------------------------------- BlendSearch

def test_prior_train_is_the_plain_blend_and_biases():
    p = synthetic_problem(200, 3, seed=6)
    est = BlendSearch(random_state=0, cfg=load_config("blend")).fit(p["oof"], p["y"], p["folds"])
    rule = est.prior_rule(p["test"])
    assert rule.mode == "train" and rule.n_iter == 0
    assert np.allclose(rule.mix, class_mix(p["y"], 4)) and np.array_equal(rule.mix,
                                                                           rule.train_mix)
    assert np.array_equal(est.predict_proba(p["test"]), np.tensordot(est.weights_, p["test"], 1))
    assert np.array_equal(est.predict(p["test"]),
                          apply_rule(est.predict_proba(p["test"]), est.biases_, 1e-6))
    assert rule.biases is est.biases_


def test_prior_em_finds_a_shifted_test_mix_and_gains_macro_f1():
    shifted = (0.15, 0.2, 0.25, 0.4)  # many more of the small class than in training
    p = synthetic_problem(581, 3, seed=7, test_prior=shifted)
    truth = class_mix(p["y_test"], 4)
    train = BlendSearch(random_state=0, cfg=load_config("blend")).fit(p["oof"], p["y"], p["folds"])
    em = BlendSearch(cfg=load_config("blend", {"prior": "em"}), random_state=0).fit(
        p["oof"], p["y"], p["folds"])
    rule = em.prior_rule(p["test"])
    assert rule.mode == "em" and rule.n_iter > 1
    assert np.abs(rule.mix - truth).sum() < 0.5 * np.abs(rule.train_mix - truth).sum()
    assert np.allclose(em.predict_proba(p["test"]).sum(axis=1), 1)
    assert np.array_equal(em.weights_, train.weights_)  # the mix changes the rule, not weights
    assert macro_f1(p["y_test"], em.predict(p["test"])) > \
        macro_f1(p["y_test"], train.predict(p["test"]))
    # each held-out fold got its own estimate, recorded with the biases applied for it
    assert all(f.prior is not None and f.prior.mix.sum() == pytest.approx(1)
               for f in em.fold_fits_.values())
    assert all(f.prior is None for f in train.fold_fits_.values())


def test_prior_em_changes_nothing_without_a_significant_shift():
    p = synthetic_problem(581, 3, seed=11)  # test drawn with the training mix
    train = BlendSearch(random_state=0, cfg=load_config("blend")).fit(p["oof"], p["y"], p["folds"])
    em = BlendSearch(cfg=load_config("blend", {"prior": "em"}), random_state=0).fit(
        p["oof"], p["y"], p["folds"])
    rule = em.prior_rule(p["test"])
    assert rule.mode == "em" and not rule.estimate.shifted
    assert rule.estimate.p_value >= 0.01 and np.array_equal(rule.mix, rule.train_mix)
    assert np.array_equal(em.predict(p["test"]), train.predict(p["test"]))
    always = BlendSearch(cfg=load_config("blend", {"prior": "em", "em_alpha": 1.0}),
                         random_state=0).fit(p["oof"], p["y"], p["folds"]).prior_rule(p["test"])
    assert always.estimate.shifted and np.array_equal(always.mix, always.estimate.em)


def test_shift_test_allows_for_the_training_mix_being_a_sample():
    probs, _ = calibrated_rows(np.array([0.1, 0.2, 0.3, 0.4]), 400, seed=4)
    mix, _ = em_prior(probs, TRAIN_MIX)
    stat, p = shift_test(probs, TRAIN_MIX, mix)
    assert stat > 30 and p < 1e-6
    stat2, p2 = shift_test(probs, TRAIN_MIX, mix, n_train=400)
    assert stat2 == pytest.approx(stat / 2) and p2 > p
    assert shift_test(probs, TRAIN_MIX, TRAIN_MIX) == (0.0, 1.0)


def test_prior_em_nested_predictions_never_see_the_held_out_labels():
    p = synthetic_problem(300, 3, seed=2)
    cfg = {"prior": "em", "em_alpha": 1.0}  # every fold adjusted, whatever the test says
    a = BlendSearch(cfg=load_config("blend", cfg), random_state=7).fit(p["oof"], p["y"], p["folds"])
    held = p["folds"] == 0
    y2 = p["y"].copy()
    y2[held] = np.random.default_rng(0).permutation(4)[y2[held]]
    b = BlendSearch(cfg=load_config("blend", cfg), random_state=7).fit(p["oof"], y2, p["folds"])
    assert np.array_equal(a.nested_pred_[held], b.nested_pred_[held])


def test_prior_em_without_biases_adjusts_only():
    p = synthetic_problem(200, 2, seed=8, test_prior=(0.1, 0.2, 0.3, 0.4))
    est = BlendSearch(cfg=load_config("blend", {"prior": "em", "biases": False, "em_alpha": 1.0}),
                      random_state=0).fit(p["oof"], p["y"], p["folds"])
    rule = est.prior_rule(p["test"])
    assert np.all(rule.biases == 0)
    assert np.array_equal(est.predict(p["test"]), rule.probs.argmax(axis=1))


def test_unknown_prior_is_refused():
    p = synthetic_problem(60, 2, seed=0)
    with pytest.raises(KitError, match="prior = 'test' is not allowed: one of train, em"):
        BlendSearch(cfg=load_config("blend", {"prior": "test"})).fit(p["oof"], p["y"], p["folds"])


# ----------------------------------------------------------------------------- intervals

def test_every_blend_score_carries_its_interval():
    p = synthetic_problem(300, 3, seed=9)
    s = BlendSearch(random_state=0, cfg=load_config("blend")).fit(p["oof"], p["y"],
                                                                  p["folds"]).scores_
    blocks = [(s["nested"], "macro_f1", "ci95"), (s["nested"], "macro_f1_no_bias", "ci95_no_bias"),
              (s["in_sample"], "macro_f1", "ci95"),
              (s["in_sample"], "macro_f1_no_bias", "ci95_no_bias"),
              (s["baselines"]["equal_weights"], "macro_f1", "ci95"),
              (s["baselines"]["best_single"], "macro_f1", "ci95")]
    for block, key, ci in blocks:
        lo, hi = block[ci]
        assert lo <= block[key] <= hi and 0.02 < hi - lo < 0.3
    for block in (s["nested"], s["in_sample"]):
        gain = block["bias_gain"]
        assert gain["diff"] == pytest.approx(block["macro_f1"] - block["macro_f1_no_bias"])
        assert gain["ci95"][0] <= gain["diff"] <= gain["ci95"][1]
        assert 0 <= gain["p_b_better"] <= 1
    again = BlendSearch(random_state=0, cfg=load_config("blend")).fit(p["oof"], p["y"],
                                                                      p["folds"]).scores_
    assert again["nested"]["ci95"] == s["nested"]["ci95"]  # seeded: the same interval
