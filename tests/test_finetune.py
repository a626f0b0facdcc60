"""Fine-tuning on pixels: the unfreeze schedule thaws the stated blocks at the stated epochs,
lr_decay gives the stated per-group learning rates, bad values fail clearly, cv routes and
resumes, tune searches both, and the resnet18_regions preset loads."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import kit.training.train as train_mod
from cv_data import make_patches, make_workdir
from kit import CLASSES
from kit.config import load_config, stage_overrides, train_settings
from kit.training.build import build_model
from kit.training.checkpoints import load_checkpoint
from kit.training.finetune import param_groups, parse_schedule, resolve_stages
from kit.training.predict import predict
from kit.training.settings import train_config, training_path
from kit.training.train import Trainer, fit_fold
from kit.utils import KitError, seed_everything

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "kit" / "conf" / "presets" / "resnet18_regions.yaml"
N, K, P = 24, 4, 32
# tiny_cnn: four conv + BatchNorm blocks, features.0 .. features.3 (features.3 is block -1).
CONV = [f"backbone.features.{i}.0.weight" for i in range(4)]
BN = [f"backbone.features.{i}.1.weight" for i in range(4)]


@pytest.fixture(scope="module")
def data():
    y = np.arange(N) % len(CLASSES)
    return make_patches(N, K, P, y, np.random.default_rng(0)), y


def _cfg(**over):
    base = {"epochs": 4, "batch_size": 16, "patience": 0, "warmup_epochs": 0.5, "lr": 3e-3,
            "early_stopping": "none", "augment": {"cutmix_alpha": 0.0}}
    base.update(over)
    return train_config(train_settings(base))


def _model(cfg, seed=0):
    seed_everything(seed)
    return build_model("tiny_cnn", cfg, "random", patch_size=P)[0]


def _params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _watch_epochs(monkeypatch):
    """Per training epoch: the parameters that changed, and the train-mode BatchNorm layers."""
    seen = []
    real = Trainer.epoch

    def epoch(self, loader, desc="train", prepare=None):
        before = _params(self.model)
        modes = {}
        orig_forward = nn.BatchNorm2d.forward

        def forward(bn, x):
            modes[id(bn)] = bn.training
            return orig_forward(bn, x)

        monkeypatch.setattr(nn.BatchNorm2d, "forward", forward)
        try:
            loss = real(self, loader, desc, prepare)
        finally:
            monkeypatch.setattr(nn.BatchNorm2d, "forward", orig_forward)
        after = dict(self.model.named_parameters())
        bns = [m for m in self.model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
        seen.append({"changed": {n for n, v in before.items() if not torch.equal(v, after[n])},
                     "bn_train": [modes.get(id(m)) for m in bns]})
        return loss

    monkeypatch.setattr(Trainer, "epoch", epoch)
    return seen


# --------------------------------------------------------------------------- schedule
def test_schedule_forms_mean_the_same_stages():
    forms = [{0: 0, 3: 1, 6: 2, 10: "all"}, [[0, 0], [3, 1], [6, 2], [10, "all"]],
             "0:0, 3:1, 6:2, 10:all", {"10": "all", "6": 2, "3": 1, "0": 0}]
    for spec in forms:
        assert resolve_stages(spec, 4) == ((0, 0), (3, 1), (6, 2), (10, 4)), spec
    assert resolve_stages("gradual:2", 3) == ((0, 0), (2, 1), (4, 2), (6, 3))
    assert resolve_stages("gradual:3:2", 8) == ((0, 0), (3, 1), (6, 2))
    assert resolve_stages({3: 2}, 4) == ((0, 0), (3, 2))  # nothing open before the first stage
    # unfreeze_last is the floor: a stage never opens fewer.
    assert resolve_stages({0: 0, 2: 1, 4: 3}, 4, unfreeze_last=2) == ((0, 2), (4, 3))
    for off in (None, [], {}, "", "none"):
        assert parse_schedule(off) is None and resolve_stages(off, 4) == ()


@pytest.mark.parametrize("spec, match", [
    ({0: 2, 3: 1}, "must not decrease"),
    ({0: -1}, "integers >= 0 or all"),
    ({0: 1.5}, "integers >= 0 or all"),
    ({"a": 1}, "epochs must be integers"),
    ("0:1,x", "cannot read"),
    ("gradual:0", "K >= 1"),
    ([[0, 1, 2]], "pairs"),
    (181, "cannot read the number 181 .* quote it"),  # YAML's unquoted 3:1
    ({0: 0, "0": 1}, "epoch given twice"),
])
def test_bad_schedules_fail_with_one_line(spec, match):
    with pytest.raises(KitError, match=match) as err:
        train_config(train_settings({"unfreeze_schedule": spec}))
    assert "unfreeze_schedule" in str(err.value) and "\n" not in str(err.value)


def test_a_schedule_opening_more_blocks_than_the_backbone_has_is_refused():
    with pytest.raises(KitError, match="tiny_cnn has 4 blocks; a stage opens 5"):
        _model(_cfg(unfreeze_schedule={0: 0, 2: 5}))
    _model(_cfg(unfreeze_schedule={0: 0, 2: "all"}))  # all is always fine


@pytest.mark.parametrize("value", [0, 1.5, -0.5, "fast", True])
def test_bad_lr_decay_fails(value):
    with pytest.raises(KitError,
                       match=r"train: lr_decay = .* is not allowed: a number > 0 and <= 1"):
        train_config(train_settings({"lr_decay": value}))


def test_a_schedule_that_opens_a_block_sends_cv_to_pixels():
    frozen = {"train_norm": []}
    assert training_path(train_config(train_settings(frozen))) == "feature_cache"
    assert training_path(train_config(train_settings({**frozen, "unfreeze_schedule": {0: 0}}))) == \
        "feature_cache"  # opens nothing
    for spec in ({0: 0, 3: 1}, "gradual:4", "0:0,2:all"):
        assert training_path(train_config(train_settings({**frozen,
                                                          "unfreeze_schedule": spec}))) == "pixels"
    # lr_decay alone opens nothing: the frozen backbone's cache path stays.
    assert training_path(train_config(train_settings({**frozen,
                                                      "lr_decay": 0.5}))) == "feature_cache"


def test_the_schedule_thaws_exactly_the_stated_blocks_at_the_stated_epochs(data, monkeypatch):
    seen = _watch_epochs(monkeypatch)
    cfg = _cfg(epochs=5, train_norm=[], unfreeze_schedule={0: 0, 1: 1, 3: "all"})
    x, y = data
    model = _model(cfg)
    initial = _params(model)
    res = fit_fold(model, x, np.arange(N), y, None, None, cfg, seed=0)
    assert [h["blocks_open"] for h in res.history] == [0, 1, 1, 4, 4]
    assert res.selection["unfreeze_stages"] == [[0, 0], [1, 1], [3, 4]]
    conv_changed = [[n for n in CONV if n in e["changed"]] for e in seen]
    assert conv_changed == [[], [CONV[3]], [CONV[3]], CONV, CONV]
    # train_norm none: a waiting block's BatchNorm stays out of the step, and in eval.
    bn_changed = [[n for n in BN if n in e["changed"]] for e in seen]
    assert bn_changed == [[], [BN[3]], [BN[3]], BN, BN]
    assert seen[0]["bn_train"] == [False, False, False, False]
    assert seen[1]["bn_train"] == [False, False, False, True]
    assert seen[3]["bn_train"] == [True, True, True, True]
    # After training every scheduled block is trainable again (the model as trained).
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert all(not torch.equal(initial[n], p) for n, p in model.named_parameters()
               if n in CONV)


def test_train_norm_layers_train_from_the_start_in_their_blocks_group(data, monkeypatch):
    seen = _watch_epochs(monkeypatch)
    cfg = _cfg(epochs=3, unfreeze_schedule={0: 0, 2: 1}, lr_decay=0.5)
    x, y = data
    fit_fold(_model(cfg), x, np.arange(N), y, None, None, cfg, seed=0)
    assert set(BN) <= seen[0]["changed"] and not set(CONV) & seen[0]["changed"]
    assert seen[0]["bn_train"] == [True] * 4  # train_norm keeps them trainable: train mode
    assert [n for n in CONV if n in seen[2]["changed"]] == [CONV[3]]


def test_lr_decay_gives_each_block_its_learning_rate():
    cfg = _cfg(lr=1e-3, lr_decay=0.5, unfreeze_last=4)
    model = _model(cfg)
    groups = param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("head", 1e-3), ("block -1", 5e-4), ("block -2", 2.5e-4), ("block -3", 1.25e-4),
        ("block -4", 6.25e-5)]
    for g in groups[1:]:
        i = 4 - g["depth"]
        assert {names[id(p)] for p in g["params"]} == {
            f"backbone.features.{i}.{m}.{w}" for m, w in ((0, "weight"), (1, "weight"),
                                                          (1, "bias"))}
    assert all(names[id(p)].startswith("head.") for p in groups[0]["params"])
    # Frozen convolutions, trainable norms: each BatchNorm in its block's group.
    frozen = param_groups(_model(_cfg(lr=1e-3, lr_decay=0.5)), _cfg(lr=1e-3, lr_decay=0.5))
    assert [len(g["params"]) for g in frozen[1:]] == [2, 2, 2, 2]
    assert [g["lr"] for g in frozen] == [g["lr"] for g in groups]
    # Off: one group at lr, as without the setting.
    one = param_groups(model, _cfg(lr=1e-3, unfreeze_last=4))
    assert len(one) == 1 and one[0]["lr"] == 1e-3
    assert len(one[0]["params"]) == sum(1 for p in model.parameters() if p.requires_grad)


def test_warmup_and_cosine_scale_every_group_and_waiting_blocks_get_no_step(data):
    cfg = _cfg(lr=1e-3, lr_decay=0.5, train_norm=[], unfreeze_schedule={0: 0, 2: "all"})
    model = _model(cfg)
    trainer = Trainer(model, cfg, "cpu", data[1], steps_per_epoch=4)
    assert len(trainer.opt.param_groups) == 5  # waiting blocks' groups exist from the start
    assert trainer.begin_epoch(0) == 0
    conv = dict(model.named_parameters())[CONV[0]]
    x = torch.randn(8, 3, P, P)
    target = torch.eye(len(CLASSES))[torch.arange(8) % 4]
    for _ in range(6):
        trainer.step(x, target)
        lrs = [g["lr"] for g in trainer.opt.param_groups]
        assert lrs == pytest.approx([lrs[0] * 0.5 ** d for d in range(5)])
    assert conv not in trainer.opt.state  # frozen: AdamW never touched it
    assert trainer.begin_epoch(2) == 4
    trainer.step(x, target)
    assert conv in trainer.opt.state


def test_the_best_epoch_before_a_thaw_restores_the_waiting_blocks_too(data, monkeypatch):
    # The first epoch scores best; the blocks that thawed afterwards must come back unchanged.
    scores = iter([1.0, 0.5, 0.5])
    scorer = SimpleNamespace(batch=lambda *a: np.array([next(scores)]))
    monkeypatch.setattr(train_mod, "get_metric", lambda name: scorer)
    cfg = _cfg(epochs=3, early_stopping="inner", train_norm=[],
               unfreeze_schedule={0: 0, 1: "all"})
    x, y = data
    model = _model(cfg)
    initial = _params(model)
    res = fit_fold(model, x, np.arange(N), y, None, None, cfg, seed=0)
    assert res.best_epoch == 1 and [h["blocks_open"] for h in res.history] == [0, 4, 4]
    for n in CONV:
        assert torch.equal(dict(model.named_parameters())[n], initial[n]), n


def test_checkpoint_and_refit_keep_the_scheduled_blocks(data, tmp_path):
    cfg = _cfg(epochs=3, early_stopping="refit", patience=0, train_norm=[],
               unfreeze_schedule="gradual:1", class_balance="sampler")
    x, y = data
    tr, va = np.arange(N)[np.arange(N) % 3 != 0], np.arange(N)[np.arange(N) % 3 == 0]
    res = fit_fold(_model(cfg), x, tr, y[tr], va, y[va], cfg, seed=1,
                   ckpt_path=tmp_path / "m.pt", full_checkpoint=False)
    refit = [h["blocks_open"] for h in res.history if h.get("refit")]
    assert refit == [0, 1, 2][:len(refit)] and len(refit) == res.best_epoch
    fresh = _model(cfg, seed=99)  # other initial weights: everything trained must come back
    load_checkpoint(fresh, tmp_path / "m.pt")
    np.testing.assert_array_equal(predict(fresh, x, va)["id"], predict(res.model, x, va)["id"])


@pytest.mark.parametrize("balance", ["sampler", "loss"])
def test_schedule_with_class_balance_is_deterministic(data, balance):
    cfg = _cfg(epochs=3, lr_decay=0.7, unfreeze_schedule={0: 0, 1: 2},
               class_balance=balance, augment={"cutmix_alpha": 0.5})
    x, y = data
    y = np.where(np.arange(N) < 16, 0, y)  # imbalanced
    a = fit_fold(_model(cfg), x, np.arange(N), y, None, None, cfg, seed=3)
    b = fit_fold(_model(cfg), x, np.arange(N), y, None, None, cfg, seed=3)
    np.testing.assert_array_equal(predict(a.model, x)["id"], predict(b.model, x)["id"])
    assert [h["blocks_open"] for h in a.history] == [0, 2, 2]


# --------------------------------------------------------------------------- cv, tune, preset
def test_cv_resumes_a_fold_with_the_same_thawing(tmp_path):
    from kit.training.cv import run_cv

    paths = make_workdir(tmp_path / "w", n_train=16, n_test=4, k=2, size=32, n_folds=2)
    cfg = {"epochs": 3, "batch_size": 16, "warmup_epochs": 0, "lr_decay": 0.7,
           "unfreeze_schedule": "0:0,1:1,2:all", "early_stopping": "none"}
    first = run_cv(paths, None, train_settings(cfg), backbone="tiny_cnn", weights="random",
                   params="none")
    out = paths.backbone_dir("tiny_cnn")
    mark = json.loads((out / "fold_1" / "done.json").read_text())
    assert [h["blocks_open"] for h in mark["history"]] == [0, 1, 4]
    oof = (out / "oof.csv").read_bytes()
    (out / "fold_1" / "done.json").unlink()  # killed inside fold 1
    again = run_cv(paths, None, train_settings(cfg), backbone="tiny_cnn", weights="random",
                   params="none")
    assert json.loads((out / "fold_1" / "done.json").read_text())["history"] == mark["history"]
    assert (out / "oof.csv").read_bytes() == oof
    assert again["oof_macro_f1"] == first["oof_macro_f1"]
    assert first["training_path"] == "pixels"


def test_full_objective_searches_both_and_features_does_not():
    import optuna

    from kit.tuning.search_space import known_param_keys, load_space

    keys = known_param_keys(train_settings())
    full = load_space("tiny_cnn", "full", load_config("tune")["space"], known_keys=keys)
    feats = load_space("tiny_cnn", "features", load_config("tune")["space"], known_keys=keys)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(8):
        params = full.suggest(study.ask())
        assert 0.5 <= params["lr_decay"] <= 1.0 and "unfreeze_schedule" in params
        cfg = train_config(train_settings(),
                           params=params)  # every sampled value is a valid setting
        build_model("tiny_cnn", cfg, "random", patch_size=P)
        assert training_path(cfg) == "pixels"
    sampled = feats.suggest(study.ask())
    assert "lr_decay" not in sampled and "unfreeze_schedule" not in sampled


def test_the_preset_loads_through_the_config_machinery():
    overrides = stage_overrides(PRESET)
    cfg = train_config(train_settings(overrides))  # unknown keys would be refused here
    assert cfg["class_balance"] == "sampler" and cfg["lr_decay"] < 1
    assert parse_schedule(cfg["unfreeze_schedule"]) is not None
    assert training_path(cfg) == "pixels"
    text = PRESET.read_text()
    assert "./run.sh patches --set select=per_region --set size=224" in text


@pytest.mark.slow
def test_cli_cv_with_the_preset_lr_decay_and_a_schedule(tmp_path):
    paths = make_workdir(tmp_path / "w", n_train=16, n_test=4, k=2, size=32, n_folds=2)
    cmd = [str(REPO / "run.sh"), "cv", "tiny_cnn", "--workdir", str(paths.root), "--weights",
           "random", "--params", "none", "--device", "cpu", "--config", str(PRESET),
           "--set", "epochs=3", "--set", "lr_decay=0.7", "--set", "unfreeze_schedule=0:0,1:2",
           "--set", "batch_size=16"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((paths.backbone_dir("tiny_cnn") / "metrics.json").read_text())
    assert metrics["training_path"] == "pixels"
    assert metrics["config"]["lr_decay"] == 0.7
    mark = json.loads((paths.backbone_dir("tiny_cnn") / "fold_0" / "done.json").read_text())
    assert [h["blocks_open"] for h in mark["history"]][:2] == [0, 2]
    bad = subprocess.run(cmd[:-4] + ["--set", "unfreeze_schedule={0: 3, 2: 1}"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "must not decrease" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_timm_cnn_gets_a_group_per_block_and_its_stem_last():
    # efficientnet_b0 (timm): its stem (conv_stem, bn1) is in no block and comes before them.
    cfg = _cfg(lr=1e-3, lr_decay=0.5, unfreeze_schedule="0:0,2:all")
    seed_everything(0)
    model = build_model("efficientnet_b0", cfg, "random", patch_size=P)[0]
    n = len(model.backbone.blocks())
    groups = param_groups(model, cfg)
    assert [g["name"] for g in groups] == ["head"] + [f"block -{j}" for j in range(1, n + 1)] \
        + ["stem"]
    stem = {id(p) for p in model.backbone.model.bn1.parameters()}
    assert {id(p) for p in groups[-1]["params"]} >= stem
    assert groups[-1]["lr"] == pytest.approx(1e-3 * 0.5 ** (n + 1))
    assert model.thaw_plan.stages == ((0, 0), (2, n))
    # The stem's norm trains from the start (train_norm); its convolution is in no block and
    # no schedule opens it.
    assert not model.backbone.model.conv_stem.weight.requires_grad


def test_resnet18_fine_tunes_with_the_preset_thawing_its_blocks_on_schedule(data, monkeypatch):
    # The leaderboard recipe's backbone: stem + layer1..4 are its blocks (layer4 is block -1).
    seen = _watch_epochs(monkeypatch)
    preset = stage_overrides(PRESET)
    cfg = train_config(train_settings({**preset, "epochs": 3, "batch_size": 16, "patience": 0,
                                       "early_stopping": "none",
                                       "unfreeze_schedule": "0:0,1:1,2:all"}))
    assert cfg["lr_decay"] < 1 and cfg["class_balance"] == "sampler"
    seed_everything(0)
    model = build_model("resnet18", cfg, "random", patch_size=P)[0]
    blocks = [f"backbone.model.{b}" for b in ("layer1", "layer2", "layer3", "layer4")]
    conv = {b: f"{b}.0.conv1.weight" for b in blocks}
    x, y = data
    res = fit_fold(model, x, np.arange(N), y, None, None, cfg, seed=0)
    assert [h["blocks_open"] for h in res.history] == [0, 1, 5]
    changed = [[b for b in blocks if conv[b] in e["changed"]] for e in seen]
    assert changed == [[], [blocks[3]], blocks]
    lrs = {g["name"]: g["lr"] for g in param_groups(model, cfg)}
    assert lrs["block -1"] == pytest.approx(cfg["lr"] * cfg["lr_decay"])
