"""The linear probe (head.type logreg): fitted in closed form, exact as a patch head."""
import numpy as np
import pytest
import torch

from head_fit import fit_head
from kit.config import load_config, train_settings
from kit.metrics import aggregate
from kit.models.heads import LinearProbe, create_head, is_probe
from kit.training.settings import train_config
from kit.training.sources import FeatureSource
from kit.utils import KitError


def _separable(n, k=4, views=2, d=16, seed=0, noise=1.0, classes=4):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    means = rng.normal(0, 3, (4, d))
    x = means[y][:, None, None, :] + rng.normal(0, noise, (n, k, views, d))
    return x.astype(np.float32), y


def _cfg(**params):
    return train_config(train_settings(), params={"head.type": "logreg", **params})


def test_logreg_config_pools_by_mean_logprob_and_builds_a_probe():
    cfg = _cfg(**{"head.pool": "attention"})
    assert cfg["head"]["pool"] == "mean_logprob"
    head = create_head(16, 4, **cfg["head"])
    assert is_probe(head) and isinstance(head, LinearProbe)
    # Same state dict keys as a depth-0 MLP head: checkpoints load either way.
    mlp = create_head(16, 4, depth=0, dropout=0.0)
    assert list(head.state_dict()) == list(mlp.state_dict())
    with pytest.raises(KitError, match="type must be one of"):
        create_head(16, 4, type="svm")


def test_probe_learns_chooses_c_on_the_inner_split_and_is_deterministic():
    x, y = _separable(64, noise=2.0)
    cfg = _cfg()
    a = fit_head(x[:48], y[:48], x[48:], y[48:], cfg, seed=3)
    b = fit_head(x[:48], y[:48], x[48:], y[48:], cfg, seed=3)
    probs = FeatureSource(x, cfg).image_probs(a.head, np.arange(48, 64))["id"]
    assert (probs.argmax(1) == y[48:]).mean() >= 0.9
    assert a.selection["early_stopping"] == "probe" and a.selection["chosen_C"] in \
        [h["C"] for h in a.history]
    assert a.best_score == max(h["val_macro_f1"] for h in a.history)
    for pa, pb in zip(a.head.state_dict().values(), b.head.state_dict().values()):
        assert torch.equal(pa, pb)


def test_patch_logits_pooled_by_mean_logprob_equal_the_image_mean_model():
    from sklearn.linear_model import LogisticRegression

    x, y = _separable(40, noise=3.0, seed=1)
    cfg = _cfg()
    fit = fit_head(x[:32], y[:32], x[32:], y[32:], cfg, seed=0)
    head = fit.head
    patch = torch.softmax(head(torch.from_numpy(x[32:, :, 0])), -1).detach().numpy()
    pooled = aggregate(patch, "mean_logprob")
    std = head[0]
    mean = std(torch.from_numpy(x[32:, :, 0])).mean(1)
    direct = torch.softmax(head[1](mean), -1).detach().numpy()
    np.testing.assert_allclose(pooled, direct, atol=1e-5)
    # ...and that model is scikit-learn's, refitted at the chosen C on all training rows
    train = std(torch.from_numpy(x[:32])).mean(1).detach().numpy()  # n x V x D
    clf = LogisticRegression(C=fit.selection["chosen_C"], class_weight="balanced",
                             max_iter=2000).fit(train.reshape(-1, 16), np.repeat(y[:32], 2))
    np.testing.assert_allclose(clf.predict_proba(mean.detach().numpy()), direct, atol=1e-4)


def test_a_class_missing_from_training_is_never_predicted():
    x, y = _separable(36, classes=3)  # no class 3
    fit = fit_head(x[:30], y[:30], x[30:], y[30:], _cfg(), seed=0)
    probs = FeatureSource(x, _cfg()).image_probs(fit.head, np.arange(36))["id"]
    assert probs[:, 3].max() < 1e-6 and (probs.argmax(1) == y).mean() > 0.9


def test_sample_weights_reach_the_probe():
    x, y = _separable(48, noise=6.0, seed=2)
    cfg = _cfg()
    from kit.models.heads import create_head as make
    from kit.training.probe import fit_probe

    src = FeatureSource(x, cfg)
    w = np.ones(48)
    a = fit_probe(make(16, 4, **cfg["head"]), src, np.arange(48), y, cfg, seed=0)
    w[y == 0] = 0.01  # class 0 hardly counts: its logits drop
    b = fit_probe(make(16, 4, **cfg["head"]), src, np.arange(48), y, cfg, seed=0,
                  sample_weight=w)
    pa = src.image_probs(a.head, np.arange(48))["id"][:, 0].mean()
    pb = src.image_probs(b.head, np.arange(48))["id"][:, 0].mean()
    assert pb < pa


def test_the_probe_refuses_the_pixel_path():
    from kit.training.probe import fit_probe
    from kit.training.sources import PixelSource

    cfg = _cfg()
    head = create_head(16, 4, **cfg["head"])
    with pytest.raises(KitError, match="cached embeddings only"):
        fit_probe(head, PixelSource(np.zeros((4, 2, 8, 8, 3), np.uint8), cfg), np.arange(4),
                  np.arange(4), cfg)


def test_c_is_chosen_by_the_given_metric_on_an_inner_split_that_keeps_groups():
    from kit.metrics import score
    from kit.training.probe import fit_probe

    x, y = _separable(48, noise=6.0, seed=4, classes=3)
    cfg = _cfg()
    src = FeatureSource(x, cfg)
    groups = np.repeat(np.arange(16), 3)  # planted: three images a patient
    res = fit_probe(create_head(16, 3, **cfg["head"]), src, np.arange(48), y, cfg, seed=1,
                    groups=groups, metric="balanced_accuracy")
    stop = np.asarray(res.selection["stop_positions"])
    fit = np.setdiff1d(np.arange(48), stop)
    assert len(stop) and set(groups[stop]).isdisjoint(groups[fit])
    assert [set(h) for h in res.history] == [{"C", "val_balanced_accuracy"}] * len(res.history)
    assert res.best_score == max(h["val_balanced_accuracy"] for h in res.history)
    # The recorded score is that metric on the stop rows, for a model fitted on the others
    # at the chosen C (the first C on ties).
    from kit.training.probe import _fit, _predict, image_means

    X = image_means(src, res.model, np.arange(48))
    clf = _fit(X[fit], y[fit], res.selection["chosen_C"])
    pred = _predict(clf, X[stop], 3)
    assert res.best_score == pytest.approx(score("balanced_accuracy", y[stop], pred,
                                                 ("a", "b", "c")))


FROZEN_CACHE = {"train_norm": "none", "unfreeze_last": 0}


def test_auto_head_is_the_probe_on_cached_embeddings_only():
    # The default head.type (auto): the probe where heads train on cached embeddings ...
    assert load_config("train")["head"]["type"] == "auto"
    cfg = train_config(train_settings(FROZEN_CACHE))
    assert cfg["head"]["type"] == "logreg" and cfg["head"]["pool"] == "mean_logprob"
    # ... the MLP on pixels (norm layers train), or with the cache turned off ...
    assert train_config(train_settings())["head"]["type"] == "mlp"
    assert train_config(train_settings(FROZEN_CACHE), feature_cache=False)["head"]["type"] == "mlp"
    # ... and when the user (or a params file) sets a key only the MLP reads: asking for it.
    for key, value in (("depth", 2), ("dropout", 0.1), ("pool", "attention")):
        cfg = train_config(train_settings({**FROZEN_CACHE, "head": {key: value}}))
        assert cfg["head"]["type"] == "mlp" and cfg["head"][key] == value
    assert train_config(train_settings(FROZEN_CACHE), {"head.width": 128})["head"]["type"] == "mlp"
    # An explicit type is kept; standardize is no MLP key.
    assert train_config(train_settings({**FROZEN_CACHE, "head": {"type": "mlp"}}))["head"][
        "type"] == "mlp"
    assert train_config(train_settings({**FROZEN_CACHE, "head": {"standardize": False}}))[
        "head"]["type"] == "logreg"
