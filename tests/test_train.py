import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cv_data import make_patches
from kit import CLASSES
from kit.config import train_settings
from kit.training.build import build_model, set_train_mode
from kit.training.checkpoints import checkpoint_keys, load_checkpoint, save_checkpoint
from kit.training.device import amp_dtype, pick_device
from kit.training.loaders import PatchDataset, make_loader
from kit.training.losses import soft_cross_entropy, warmup_cosine
from kit.training.predict import predict
from kit.training.selection import inner_split
from kit.training.settings import train_config, tta_views
from kit.training.train import fit_fold
from kit.utils import KitError, seed_everything

N, K, P = 24, 4, 32


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = np.arange(N) % len(CLASSES)
    return make_patches(N, K, P, y, rng), y


def _cfg(**over):
    base = {"epochs": 2, "batch_size": 16, "patience": 0, "warmup_epochs": 0.5}
    base.update(over)
    return train_config(train_settings(base))


def _model(cfg, seed=0, backbone="tiny_cnn"):
    seed_everything(seed)
    return build_model(backbone, cfg, "random", patch_size=P)[0]


def _split():
    idx = np.arange(N)
    return idx[idx % 3 != 0], idx[idx % 3 == 0]


def _fit(data, cfg, seed=0, **kw):
    x, y = data
    tr, va = _split()
    return fit_fold(_model(cfg, seed), x, tr, y[tr], va, y[va], cfg, seed=seed, **kw)


# ------------------------------------------------------------------ config, schedule, loss
def test_train_config_applies_dotted_params_then_overrides():
    cfg = train_config(train_settings({"lr": 0.5}), {"head.depth": 3, "augment.cutmix_alpha": 0.25,
                                                     "lr": 0.1})
    assert cfg["head"]["depth"] == 3 and cfg["head"]["width"] == 256
    assert cfg["augment"]["cutmix_alpha"] == 0.25 and cfg["augment"]["hflip"] == 0.5
    assert cfg["lr"] == 0.5  # explicit overrides win over tuned params
    with pytest.raises(KitError, match="unknown key 'dpth'"):
        train_config(train_settings(), params={"head.dpth": 1})
    assert tta_views("flips") == ("id", "hflip", "vflip")
    assert tta_views("none") == ("id",)
    assert len(tta_views("dihedral")) == 8
    with pytest.raises(KitError, match="unknown TTA view 'mirror'; known views"):
        tta_views("mirror")


def test_warmup_cosine_schedule():
    total, warm = 100, 10
    lrs = [warmup_cosine(s, total, warm, 0.01) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))  # linear ramp up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine decay
    assert warmup_cosine(total, total, warm, 0.01) == pytest.approx(0.01)


def test_soft_cross_entropy_matches_torch_on_hard_targets():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 0, 0, 1, 2])
    target = F.one_hot(y, 4).float()
    assert soft_cross_entropy(logits, target) == pytest.approx(float(F.cross_entropy(logits, y)))
    w = torch.tensor([1.0, 2.0, 0.5, 3.0])
    assert soft_cross_entropy(logits, target, w) == pytest.approx(
        float(F.cross_entropy(logits, y, weight=w)), rel=1e-5)


def test_devices_and_precision():
    assert pick_device("cpu").type == "cpu"
    assert pick_device(None).type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(KitError, match="--device cpu"):
            pick_device("cuda")
    cpu = torch.device("cpu")
    assert amp_dtype(cpu, "auto") is None  # mixed precision is a CUDA matter
    assert amp_dtype(cpu, "bf16") == torch.bfloat16 and amp_dtype(cpu, "off") is None
    assert amp_dtype(cpu, False) is None  # YAML reads a bare `amp: off` as false
    from kit.training.device import auto_flag as _flag
    from kit.training.device import n_workers

    assert _flag("auto", cpu) is False and _flag(False, cpu) is False and _flag(True, cpu)
    assert n_workers("auto", cpu) == 0 and n_workers(2, cpu) == 2
    # The values themselves are the schema's to refuse, at load, before any work.
    for bad, key in (({"amp": "fp8"}, "amp"), ({"num_workers": "many"}, "num_workers"),
                     ({"channels_last": "sometimes"}, "channels_last")):
        with pytest.raises(KitError, match=rf"train: {key} = "):
            train_settings(bad)


def test_input_size_resizes_on_the_device(data):
    cfg = _cfg(input_size=16)
    model = _model(cfg)
    assert model.backbone.input_size == 16
    assert predict(model, data[0], rows=[0])["id"].shape == (1, K, len(CLASSES))


# ------------------------------------------------------------------ data path
def test_dataset_reads_patch_k_of_image_rows_in_batch_order(data):
    x, y = data
    rows = np.array([5, 2, 7])
    ds = PatchDataset(x, rows, y[rows])
    assert len(ds) == 3 * K
    xb, yb = ds.__getitems__([0, 5, 11, 6])
    np.testing.assert_array_equal(xb.numpy(), x[[5, 2, 7, 2], [0, 1, 3, 2]])
    assert yb.tolist() == [y[5], y[2], y[7], y[2]]
    assert xb.dtype == torch.uint8 and xb.shape == (4, P, P, 3)
    assert ds[6][0].shape == (P, P, 3)


def test_loader_is_seeded_and_balanced_sampler_is_used(data):
    x, y = data
    cfg = _cfg()
    ds = PatchDataset(x, np.arange(N), y)

    def order(seed):
        return [b[1].tolist() for b in make_loader(ds, cfg, seed, torch.device("cpu"))]

    assert order(1) == order(1) and order(1) != order(2)
    loader = make_loader(ds, _cfg(class_balance="sampler"), 1, torch.device("cpu"))
    assert isinstance(loader.sampler, torch.utils.data.WeightedRandomSampler)


# ------------------------------------------------------------------ training
def test_fit_fold_is_deterministic_on_cpu(data, tmp_path):
    a = _fit(data, _cfg(), seed=3)
    b = _fit(data, _cfg(), seed=3)
    c = _fit(data, _cfg(), seed=4)
    np.testing.assert_array_equal(a.val_probs, b.val_probs)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert not np.array_equal(a.val_probs, c.val_probs)  # the seed matters
    pa = predict(a.model, data[0], views=("id", "hflip"))
    pb = predict(b.model, data[0], views=("id", "hflip"))
    for v in pa:
        np.testing.assert_array_equal(pa[v], pb[v])


def test_fit_fold_deterministic_with_a_worker_process(data):
    cfg = _cfg(num_workers=1, epochs=1)
    a, b = _fit(data, cfg, seed=5), _fit(data, cfg, seed=5)
    np.testing.assert_array_equal(a.val_probs, b.val_probs)


def test_fit_fold_learns_an_easy_signal(data):
    # Random frozen convolutions + trainable BatchNorm and head pick up a colour tint.
    cfg = _cfg(epochs=8, lr=3e-3, unfreeze_last=4, **{"augment": {"cutmix_alpha": 0.0}})
    res = _fit(data, cfg, seed=0)
    assert res.best_score >= 0.75, res.history
    assert res.history[0]["loss"] > res.history[-1]["loss"]


def test_early_stopping_keeps_the_best_epoch(data):
    # lr 0: nothing changes, so epoch 1 stays best and patience 2 stops after epoch 3.
    res = _fit(data, _cfg(epochs=10, patience=2, lr=0.0), seed=0)
    assert res.best_epoch == 1 and res.epochs == 3


# ------------------------------------------------------------------ choosing the epoch
def test_inner_split_is_stratified_grouped_and_seeded():
    y = np.repeat(np.arange(4), 10)
    groups = np.arange(40) // 2  # pairs that must stay together
    fit_a, stop_a = inner_split(y, groups, n_splits=5, seed=1)
    fit_b, stop_b = inner_split(y, groups, n_splits=5, seed=1)
    _, stop_c = inner_split(y, groups, n_splits=5, seed=2)
    np.testing.assert_array_equal(stop_a, stop_b)
    assert not np.array_equal(stop_a, stop_c)
    assert sorted(np.concatenate([fit_a, stop_a]).tolist()) == list(range(40))
    assert set(groups[fit_a]).isdisjoint(groups[stop_a])
    assert np.bincount(y[stop_a], minlength=4).tolist() == [2, 2, 2, 2]
    with pytest.raises(KitError, match="early-stopping none"):
        inner_split(np.array([0, 1]), None, 5, 0)


def _scrambled(y, va):
    z = y.copy()
    z[va] = (z[va] + 1) % len(CLASSES)
    return z


@pytest.mark.parametrize("mode", ["inner", "refit", "none"])
def test_honest_modes_never_read_the_validation_labels(data, mode):
    x, y = data
    tr, va = _split()
    cfg = _cfg(epochs=3, early_stopping=mode, patience=1)
    a = fit_fold(_model(cfg, 0), x, tr, y[tr], va, y[va], cfg, seed=0)
    b = fit_fold(_model(cfg, 0), x, tr, y[tr], va, _scrambled(y, va)[va], cfg, seed=0)
    pa, pb = predict(a.model, x, va)["id"], predict(b.model, x, va)["id"]
    np.testing.assert_array_equal(pa, pb)
    assert a.selection["early_stopping"] == mode and a.selection["epochs_honest"]


def test_oof_mode_chooses_on_the_validation_rows_and_says_so(data):
    x, y = data
    tr, va = _split()
    cfg = _cfg(epochs=2, early_stopping="oof")
    res = fit_fold(_model(cfg, 0), x, tr, y[tr], va, y[va], cfg, seed=0)
    assert res.val_probs.shape == (len(va), len(CLASSES))
    assert not res.selection["epochs_honest"] and "optimistic" in res.selection["stop"]


def test_inner_keeps_its_best_epoch_and_refit_retrains_that_many_on_everything(data):
    cfg = _cfg(epochs=4, early_stopping="inner", patience=0)
    inner = _fit(data, cfg, seed=1)
    scores = [h["val_macro_f1"] for h in inner.history]
    assert inner.best_score == max(scores) == scores[inner.best_epoch - 1]
    assert inner.selection["n_fit"] + inner.selection["n_stop"] == len(_split()[0])
    refit = _fit(data, _cfg(epochs=4, early_stopping="refit", patience=0), seed=1)
    assert refit.best_epoch == inner.best_epoch
    again = [h for h in refit.history if h.get("refit")]
    assert len(again) == inner.best_epoch and refit.selection["n_fit"] == len(_split()[0])
    none = _fit(data, _cfg(epochs=3, early_stopping="none"), seed=1)
    assert none.best_epoch == none.epochs == 3 and none.best_score != none.best_score  # NaN
    with pytest.raises(KitError, match="early_stopping = 'best' is not allowed: one of auto"):
        _fit(data, _cfg(early_stopping="best"), seed=1)


def test_the_epoch_is_chosen_by_the_tasks_metric_on_the_stop_rows(data):
    """fit(metric=...) compares epochs by that metric (a task's), recorded as val_<metric>:
    each epoch's record is the metric of that epoch's stop-row predictions."""
    from kit.metrics import score
    from kit.training.sources import PixelSource
    from kit.training.train import fit

    x, y = data
    cfg = _cfg(epochs=3, early_stopping="oof", patience=0)
    tr, va = _split()
    seen = []
    source = PixelSource(x, cfg)
    real = source.image_probs

    def spy(model, rows, views, desc=""):
        out = real(model, rows, views, desc)
        seen.append(out["id"])
        return out

    source.image_probs = spy
    res = fit(_model(cfg), source, tr, y[tr], cfg, val_rows=va, val_y=y[va], seed=0,
              metric="balanced_accuracy")
    scores = [h["val_balanced_accuracy"] for h in res.history]
    assert all("val_macro_f1" not in h for h in res.history) and len(seen) == 3
    assert scores == pytest.approx([score("balanced_accuracy", y[va], p, CLASSES)
                                    for p in seen])
    assert res.best_score == max(scores) == scores[res.best_epoch - 1]


def test_class_balanced_loss_and_sampler_train(data):
    for balance in ("loss", "sampler"):
        res = _fit(data, _cfg(epochs=1, class_balance=balance), seed=0)
        assert res.val_probs.shape == (res.selection["n_stop"], len(CLASSES))
    with pytest.raises(KitError, match="class_balance"):
        _fit(data, _cfg(epochs=1, class_balance="oversample"), seed=0)


def test_frozen_batchnorm_keeps_its_statistics(data):
    cfg = _cfg(epochs=1, train_norm=[], head={"type": "mlp"})  # head only, trained on pixels
    model = _model(cfg)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    x, y = data
    tr, va = _split()
    fit_fold(model, x, tr, y[tr], va, y[va], cfg, seed=0)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    set_train_mode(model)
    assert not model.backbone.features[0][1].training and model.head.training


def test_out_of_memory_suggests_batch_size_and_writes_nothing(data, tmp_path, monkeypatch):
    cfg = _cfg(epochs=1)
    model = _model(cfg)

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model.head, "forward", boom)
    x, y = data
    tr, va = _split()
    ckpt = tmp_path / "fold" / "model.pt"
    with pytest.raises(KitError, match="--batch-size"):
        fit_fold(model, x, tr, y[tr], va, y[va], cfg, seed=0, ckpt_path=ckpt)
    assert not ckpt.exists()


# ------------------------------------------------------------------ checkpoints, prediction
def test_checkpoint_loads_with_weights_only(data, tmp_path):
    x, y = data
    cfg = _cfg(epochs=1)
    res = _fit(data, cfg, seed=1, ckpt_path=tmp_path / "full.pt", full_checkpoint=True)
    raw = torch.load(tmp_path / "full.pt", weights_only=True)  # plain tensors and types only
    assert raw["full"] and raw["meta"]["best_epoch"] == res.best_epoch
    other = _model(cfg, seed=99)  # different random init
    load_checkpoint(other, tmp_path / "full.pt")
    np.testing.assert_array_equal(predict(other, x)["id"], predict(res.model, x)["id"])

    # Partial: trainable tensors and buffers only; the frozen rest comes from the same init.
    save_checkpoint(res.model, tmp_path / "part.pt", full=False, meta={})
    part = torch.load(tmp_path / "part.pt", weights_only=True)["state_dict"]
    assert "backbone.features.0.0.weight" not in part  # a frozen conv
    assert "backbone.features.0.1.running_mean" in part and "head.1.weight" in part
    assert "head.0.mean" in part and "head.0.std" in part  # the standardisation statistics
    assert set(part) == set(checkpoint_keys(res.model, full=False))
    same_init = _model(cfg, seed=1)
    load_checkpoint(same_init, tmp_path / "part.pt")
    np.testing.assert_array_equal(predict(same_init, x)["id"], predict(res.model, x)["id"])
    with pytest.raises(KitError, match="does not fit"):
        load_checkpoint(_model(_cfg(**{"head": {"depth": 0}})), tmp_path / "part.pt")


def test_predict_views_see_transformed_patches(data):
    x, _ = data
    model = _model(_cfg())
    p = predict(model, x, rows=[3, 1], views=("id", "hflip", "vflip"), batch_size=5)
    assert p["id"].shape == (2, K, len(CLASSES))
    np.testing.assert_allclose(p["id"].sum(-1), 1.0, rtol=1e-5)
    flipped = np.ascontiguousarray(x[:, :, :, ::-1])  # mirror the patches on the width axis
    q = predict(model, flipped, rows=[3, 1], views=("hflip",))
    np.testing.assert_allclose(q["hflip"], p["id"], atol=1e-5)
    assert not np.allclose(p["hflip"], p["id"])


def test_bench_train_times_both_loops(data):
    from kit.bench.train import bench_backbone

    x, y = data
    r = bench_backbone("tiny_cnn", x, y, _cfg(), torch.device("cpu"), repeats=1, seed=0)
    # Both loops saw every patch once per epoch; the speeds are the bench's output, not
    # something a shared test machine can assert.
    assert r["patches"] == N * K and r["trainable"] > 0 and r["workers"] == 0
    assert set(r) >= {"kit_s", "bare_s", "data_s", "ratio", "kit_ips", "bare_ips"}


def test_random_backbones_get_their_batchnorm_recalibrated_with_a_warning(data, capsys):
    from kit.training.build import recalibrate_random

    x, _ = data
    cfg = _cfg()
    model = _model(cfg)
    bn = model.backbone.features[0][1]
    assert torch.all(bn.running_mean == 0)
    assert recalibrate_random(model.backbone, cfg, x, np.arange(8)) > 0
    assert not torch.all(bn.running_mean == 0)
    assert "random weights" in capsys.readouterr().out
    model.backbone.weights_source = "local:/somewhere"  # pretrained: left alone under auto
    assert recalibrate_random(model.backbone, cfg, x) == 0
    assert recalibrate_random(_model(cfg).backbone, {**cfg, "recalibrate_bn": False}, x) == 0
    with pytest.raises(KitError, match="train: recalibrate_bn = 'sometimes'"):
        train_settings({"recalibrate_bn": "sometimes"})  # refused at load, by the schema


def test_attention_model_trains_on_whole_images_and_predicts_images(data):
    from kit.models.heads import MILClassifier

    x, y = data
    cfg = _cfg(epochs=2, **{"head": {"pool": "attention"}})
    model = _model(cfg)
    assert isinstance(model, MILClassifier)
    tr, va = _split()
    res = fit_fold(model, x, tr, y[tr], va, y[va], cfg, seed=0)
    probs = predict(res.model, x, va, views=("id", "hflip"))
    assert probs["id"].shape == (len(va), len(CLASSES))  # one prediction per image
    np.testing.assert_allclose(probs["hflip"].sum(1), 1.0, atol=1e-5)
    again = fit_fold(_model(cfg), x, tr, y[tr], va, y[va], cfg, seed=0)
    np.testing.assert_array_equal(predict(again.model, x, va)["id"], probs["id"])
