"""Embedding cache (hit, miss, invalidation, correctness) and heads on cached embeddings."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cv_data import make_workdir
from head_fit import fit_head
from kit import CLASSES
from kit.config import load_config, train_settings
from kit.data.patches import load_patches
from kit.metrics import fast_macro_f1, macro_f1
from kit.training.checkpoints import weights_digest
from kit.training.feature_cv import FeatureCV, features_cv, prepare
from kit.training.features import (
    Features,
    _publish,
    cache_views,
    embed_array,
    frozen_backbone,
    load_or_embed,
)
from kit.training.settings import train_config
from kit.utils import KitError

FAST = {"epochs": 12, "lr": 0.01, "patience": 0}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("features"), n_train=24, n_test=6, k=4, size=32,
                        n_folds=3, seed=0)


@pytest.fixture(scope="module")
def backbone():
    return frozen_backbone("tiny_cnn", train_config(train_settings()), weights="random", seed=42,
                           patch_size=32)


def test_fast_macro_f1_equals_the_metric():
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(1, 25))
        yt = rng.integers(0, int(rng.integers(1, 5)), n)
        yp = rng.integers(0, int(rng.integers(1, 5)), n)
        assert fast_macro_f1(yt, yp) == pytest.approx(macro_f1(yt, yp), abs=1e-12)


def test_cache_views_put_id_first():
    assert cache_views(("hflip", "id", "vflip")) == ("id", "hflip", "vflip")
    assert cache_views(("hflip",)) == ("id", "hflip")


def test_embeddings_are_the_frozen_backbone_outputs_per_view(work, backbone):
    from kit.models.normalize import normalize_batch
    from kit.training.tta import apply_view

    patches = load_patches(work, "train")
    views = ("id", "hflip", "rot90")
    out = np.zeros((2, 4, 3, backbone.num_features), np.float32)
    embed_array(backbone, patches.array[:2], views, out, batch_size=4)
    x = torch.from_numpy(np.array(patches.array[1, 2:3]))
    x = normalize_batch(x, backbone.mean, backbone.std, backbone.input_size)
    with torch.no_grad():
        want = backbone(apply_view(x, "rot90")).numpy()[0]
        other = backbone(x).numpy()[0]
    np.testing.assert_allclose(out[1, 2, 2], want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(want, other)  # the views really differ


def test_cache_miss_then_hit(work, backbone, capsys):
    patches = load_patches(work, "train")
    first = load_or_embed(backbone, patches, work, "train", ("id", "hflip"),
                          load_config("features"))
    assert not first.hit and "embedded" in capsys.readouterr().out
    second = load_or_embed(backbone, patches, work, "train", ("id", "hflip"),
                           load_config("features"))
    assert second.hit and second.key == first.key and second.path == first.path
    assert "embedded" not in capsys.readouterr().out
    assert second.array.shape == (24, 4, 2, backbone.num_features)
    assert second.array.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(first.array), np.asarray(second.array))
    meta = json.loads((first.path / "meta.json").read_text())
    assert meta["views"] == ["id", "hflip"] and meta["patch_key"] == patches.key
    assert meta["weights_sha256"] == weights_digest(backbone)
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_cache_invalidated_by_patches_weights_views_and_dtype(work, backbone, tmp_path):
    patches = load_patches(work, "train")
    base = load_or_embed(backbone, patches, work, "train", ("id",), load_config("features"))
    # Other views or dtype: another key.
    assert load_or_embed(backbone, patches, work, "train", ("id", "vflip"),
                         load_config("features")).key != base.key
    f32 = load_or_embed(backbone, patches, work, "train", ("id",),
                        load_config("features", {"dtype": "float32"}))
    assert f32.key != base.key and f32.array.dtype == np.float32
    # Other weights (one BatchNorm statistic moved): a miss with another key.
    other = frozen_backbone("tiny_cnn", train_config(train_settings()), weights="random", seed=42,
                            patch_size=32)
    with torch.no_grad():
        next(m for m in other.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_mean += 1
    changed = load_or_embed(other, patches, work, "train", ("id",), load_config("features"))
    assert not changed.hit and changed.key != base.key
    # Changed patches (new cache key, new pixels): a miss whose vectors differ.
    moved = make_workdir(tmp_path, n_train=24, n_test=6, k=4, size=32, n_folds=3, seed=1)
    new = load_or_embed(backbone, load_patches(moved, "train"), moved, "train", ("id",),
                        load_config("features"))
    assert not new.hit and new.key != base.key
    assert not np.allclose(np.asarray(new.array), np.asarray(base.array))


def test_embedding_under_autocast_gets_its_own_key_and_close_vectors(work, backbone):
    patches = load_patches(work, "train")
    f32 = load_or_embed(backbone, patches, work, "train", ("id",),
                        load_config("features", {"dtype": "float32"}))
    # auto is float32 on the CPU: the same key (and cache) as before autocast existed.
    auto = load_or_embed(backbone, patches, work, "train", ("id",),
                         load_config("features", {"dtype": "float32", "amp": "auto"}))
    assert auto.hit and auto.key == f32.key
    bf16 = load_or_embed(backbone, patches, work, "train", ("id",),
                         load_config("features", {"dtype": "float32", "amp": "bf16"}))
    assert not bf16.hit and bf16.key != f32.key and bf16.meta["autocast"] == "bf16"
    a, b = np.asarray(f32.array), np.asarray(bf16.array)
    assert not np.array_equal(a, b)  # bf16 really ran
    scale = np.abs(a).max()
    np.testing.assert_allclose(b, a, atol=0.05 * scale)


def test_a_damaged_cache_is_rebuilt(work, backbone):
    patches = load_patches(work, "train")
    feats = load_or_embed(backbone, patches, work, "train", ("id", "transpose"),
                          load_config("features"))
    (feats.path / "meta.json").write_text("{not json")
    again = load_or_embed(backbone, patches, work, "train", ("id", "transpose"),
                          load_config("features"))
    assert not again.hit and json.loads((again.path / "meta.json").read_text())["key"] == feats.key


def test_publish_keeps_a_finished_copy_of_another_worker(tmp_path):
    done, mine = tmp_path / "train-abc", tmp_path / ".train-abc.1.tmp"
    for folder, tag in ((done, "theirs"), (mine, "mine")):
        folder.mkdir()
        (folder / "features.npy").write_text(tag)
        (folder / "meta.json").write_text(json.dumps({"key": "abc"}))
    _publish(mine, done, "abc")
    assert (done / "features.npy").read_text() == "theirs"


def _separable(n, k=4, views=2, d=16, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    means = rng.normal(0, 3, (4, d))
    x = means[y][:, None, None, :] + rng.normal(0, noise, (n, k, views, d))
    return x.astype(np.float32), y


def test_head_learns_and_is_deterministic():
    x, y = _separable(48)
    cfg = train_config(train_settings(), params={"epochs": 15, "lr": 0.01, "patience": 5,
                                                 "batch_size": 16,
                               "early_stopping": "inner"})
    a = fit_head(x[:32], y[:32], x[32:], y[32:], cfg, seed=3)
    b = fit_head(x[:32], y[:32], x[32:], y[32:], cfg, seed=3)
    assert a.best_score == 1.0
    for pa, pb in zip(a.head.parameters(), b.head.parameters()):
        assert torch.equal(pa, pb)
    assert [h["val_macro_f1"] for h in a.history] == [h["val_macro_f1"] for h in b.history]


def test_head_stops_early_and_keeps_the_best_epoch():
    x, y = _separable(40, noise=8.0, seed=1)  # mostly noise: the score wanders
    cfg = train_config(train_settings(), params={"epochs": 40, "lr": 0.05, "patience": 2,
                                                 "batch_size": 16,
                               "early_stopping": "inner"})
    fit = fit_head(x[:28], y[:28], x[28:], y[28:], cfg, seed=0)
    scores = [h["val_macro_f1"] for h in fit.history]
    assert fit.epochs < 40 and fit.epochs - fit.best_epoch == 2
    assert fit.best_score == max(scores) == scores[fit.best_epoch - 1]


def test_class_balance_options_train(work):
    x, y = _separable(32)
    for balance in ("loss", "sampler"):
        cfg = train_config(train_settings(), params={"epochs": 3, "class_balance": balance,
                                                     "batch_size": 16})
        assert fit_head(x[:24], y[:24], x[24:], y[24:], cfg).epochs == 3
    with pytest.raises(KitError, match="train: class_balance = 'oversample'"):
        train_settings({"class_balance": "oversample"})  # refused at load, by the schema


def test_features_cv_covers_every_image_once_and_scores_like_cv(work):
    res = features_cv("tiny_cnn", work, params=FAST, seed=7, weights="random",
                      settings=train_settings())
    folds = pd.read_csv(work.folds_csv)
    assert list(res.oof.sample_index) == list(folds.sample_index)  # folds-file order, once each
    assert list(res.oof.fold) == list(folds.fold)
    assert list(res.oof.label) == list(folds.label)
    probs = res.oof[[f"p_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert res.oof_macro_f1 == pytest.approx(macro_f1(res.oof.label, probs))
    for row in res.per_fold:
        sel = res.oof.fold == row["fold"]
        assert row["macro_f1"] == pytest.approx(macro_f1(res.oof.label[sel], probs[sel]))
    # TTA mean = mean of the per-view files, as cv writes them.
    views = np.mean([v[[f"p_{c}" for c in CLASSES]].to_numpy() for v in res.oof_views.values()], 0)
    np.testing.assert_allclose(views, probs, atol=1e-6)
    assert set(res.oof_views) == {"id", "hflip", "vflip"}
    assert len(res.test) == 6 and res.features["test_key"]
    assert res.oof_macro_f1 > 0.5  # the tint signal is learnt from frozen random features


def test_fold_results_do_not_depend_on_the_order_of_folds(work):
    fcv = prepare("tiny_cnn", work, params=FAST, seed=5, weights="random", with_test=False,
                  settings=train_settings())
    late = [fcv.fold(k) for k in (0, 1, 2)][2]
    first = fcv.fold(2)
    np.testing.assert_array_equal(first.probs, late.probs)
    assert first.macro_f1 == late.macro_f1


def test_configure_refuses_views_that_are_not_cached(work):
    fcv = prepare("tiny_cnn", work, seed=5, weights="random", with_test=False,
                  settings=train_settings())
    assert fcv.configure({"head.depth": 0}).cfg["head"]["depth"] == 0
    with pytest.raises(KitError, match="not in the embedding cache"):
        fcv.configure({"tta": "dihedral"})


def test_folds_with_images_missing_from_the_cache_are_refused(work, tmp_path):
    paths = make_workdir(tmp_path, n_train=12, n_test=2, k=2, size=32, n_folds=3)
    folds = pd.read_csv(paths.folds_csv)
    pd.concat([folds, pd.DataFrame([{"sample_index": "img_9999.png", "label": CLASSES[0],
                                     "fold": 0}])]).to_csv(paths.folds_csv, index=False)
    with pytest.raises(KitError, match="not in the patch cache"):
        prepare("tiny_cnn", paths, weights="random", with_test=False, settings=train_settings())


def test_in_memory_feature_sets_work_without_disk():
    x, y = _separable(24, views=3)
    ids = [f"img_{i:04d}.png" for i in range(24)]
    labels = [CLASSES[c] for c in y]
    feats = Features(x, pd.DataFrame({"sample_index": ids, "label": labels}),
                     ("id", "hflip", "vflip"), "mem", None, True)
    folds = pd.DataFrame({"sample_index": ids, "label": labels, "fold": np.arange(24) % 3})
    fcv = FeatureCV(feats, folds, train_config(train_settings(), params=FAST), ("id", "hflip",
                                                                                "vflip"))
    assert fcv.fold(1).macro_f1 == 1.0


def test_nothing_trains_detects_a_fully_frozen_config():
    from kit.training.settings import nothing_trains

    assert not nothing_trains(train_config(train_settings()))  # the default trains the norm layers
    assert nothing_trains(train_config(train_settings({"train_norm": []})))
    assert nothing_trains(train_config(train_settings({"train_norm": "none"})))
    assert not nothing_trains(train_config(train_settings({"train_norm": [], "unfreeze_last": 1})))


def test_float16_cache_checks_its_range():
    from kit.training.features import storage_dtype

    rng = np.random.default_rng(0)
    normal = rng.normal(0, 1, (50, 8)).astype(np.float32)
    assert storage_dtype(normal, "float16") == ("float16", None)
    stored, problem = storage_dtype(normal * 3e-5, "float16")  # a random EfficientNet's scale
    assert stored == "float32" and "underflow" in problem
    stored, problem = storage_dtype(normal * 1e6, "float16")
    assert stored == "float32" and "overflow" in problem
    assert storage_dtype(normal * 3e-5, "float32") == ("float32", None)


def test_tiny_embeddings_are_stored_as_float32_and_said_so(work, backbone, capsys):
    import copy

    import torch

    patches = load_patches(work, "train")
    tiny = copy.deepcopy(backbone)
    with torch.no_grad():  # scale the last block's BatchNorm down: embeddings ~1e-6
        last_bn = [m for m in tiny.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
        last_bn.weight.mul_(1e-6)
        last_bn.bias.mul_(1e-6)
    feats = load_or_embed(tiny, patches, work, "train", ("id",), load_config("features"))
    assert feats.array.dtype == np.float32 and feats.meta["stored_dtype"] == "float32"
    assert "underflow" in capsys.readouterr().out
    assert np.abs(np.asarray(feats.array)).max() > 0


def test_attention_head_learns_from_one_informative_patch_per_image():
    from kit.training.sources import attention_weights

    rng = np.random.default_rng(0)
    n, k, d = 64, 6, 8
    y = np.arange(n) % 4
    x = rng.normal(0, 1, (n, k, 1, d)).astype(np.float32)
    where = rng.integers(0, k, n)
    x[np.arange(n), where, 0, :4] += 4 * np.eye(4)[y]  # the class lives in one patch only
    cfg = train_config(train_settings(), params={"epochs": 30, "lr": 0.01, "batch_size": 48,
                                                 "head.pool": "attention",
                               "head.dropout": 0.0, "early_stopping": "none"})
    fit = fit_head(x[:48], y[:48], x[48:], y[48:], cfg, seed=0)
    from kit.training.sources import FeatureSource

    probs = FeatureSource(x, cfg).image_probs(fit.head, np.arange(48, n))["id"]
    assert (probs.argmax(1) == y[48:]).mean() >= 0.75
    w = attention_weights(fit.head, x[48:])
    assert (w.argmax(1) == where[48:]).mean() >= 0.6  # it looks at the informative patch


def test_auto_early_stopping_is_a_fixed_budget_on_cached_embeddings():
    x, y = _separable(32)
    cfg = train_config(train_settings(), params={"epochs": 3, "batch_size": 16})
    assert cfg["early_stopping"] == "auto"
    fit = fit_head(x[:24], y[:24], x[24:], y[24:], cfg, seed=0)
    assert fit.selection["early_stopping"] == "none" and fit.epochs == fit.best_epoch == 3
