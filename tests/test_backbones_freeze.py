"""Freezing and AdaBN (kit.models.backbones.freeze) on every backbone, and the real timm CNNs
(kit.models.backbones.timm_cnn): forward, one training step, their blocks, ResNet sizes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import test_backbones
from kit.models import backbones as B
from kit.models.backbones import count_trainable, create_backbone, freeze_backbone
from kit.models.heads import PatchClassifier, create_head
from kit.utils import KitError
from test_backbones import (
    NORMS,
    RESNETS,
    TIMM_VITS,
    TINY_DINOV2,
    TINY_PHIKON,
    TINY_TIMM,
    _assert_trainable,
)

# test_backbones' autouse fixtures, bound here so that they apply to this file too: empty
# caches, HF_HUB_OFFLINE=1, one intra-op thread.
backbones_offline = test_backbones.backbones_offline
backbones_one_thread = test_backbones.backbones_one_thread


@pytest.fixture(scope="module")
def timm_models():
    """The real timm CNNs, random weights, built once (a few seconds each)."""
    torch.manual_seed(0)
    return {name: create_backbone(name, weights="random", patch_size=64)
            for name in ("efficientnet_b0", "convnext_tiny", *RESNETS)}


# --------------------------------------------------------------------------- real timm models
@pytest.mark.parametrize("name", ["efficientnet_b0", "convnext_tiny", *RESNETS])
def test_timm_backbone_forward_and_one_training_step(timm_models, name):
    bb = timm_models[name]
    assert bb.weights_source == "random"
    assert bb.input_size == 64  # CNNs take the patches at the patch size
    assert bb.mean == B.IMAGENET_MEAN and bb.std == B.IMAGENET_STD
    assert bb.num_features == {"efficientnet_b0": 1280, "convnext_tiny": 768, "resnet18": 512,
                               "resnet50": 2048}[name]
    n_trainable = freeze_backbone(bb, unfreeze_last=1)
    assert 0 < n_trainable < sum(p.numel() for p in bb.parameters())
    model = PatchClassifier(bb, create_head(bb.num_features, 4, depth=1, width=16)).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])  # the smallest size both accept
    assert model.features(x).shape == (2, bb.num_features)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable  # frozen weights never move
    assert any(n.startswith("head.") for n in changed)
    assert any(n.startswith("backbone.") for n in changed)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_blocks_are_the_stem_and_four_stages(timm_models, name):
    bb = timm_models[name]
    m = bb.model
    assert isinstance(bb, B.ResNetBackbone) and type(m.fc).__name__ == "Identity"
    blocks = bb.blocks()
    assert len(blocks) == 5
    assert list(blocks[0]) == [m.conv1, m.bn1] and blocks[1:] == [m.layer1, m.layer2, m.layer3,
                                                                   m.layer4]
    # every parameter is in exactly one block: thawing them all thaws the whole network
    ids = [id(p) for block in blocks for p in block.parameters()]
    assert len(ids) == len(set(ids)) == len(list(bb.parameters()))
    freeze_backbone(bb, train_norm=(), unfreeze_last=2)  # layer3 and layer4
    assert all(p.requires_grad for p in m.layer3.parameters())
    assert not any(p.requires_grad for p in m.layer2.parameters())
    assert not m.conv1.weight.requires_grad
    n_bn = freeze_backbone(bb)  # only the BatchNorm layers train
    assert n_bn == sum(p.numel() for mod in bb.modules() if isinstance(mod, nn.BatchNorm2d)
                       for p in mod.parameters(recurse=False)) > 0


@pytest.mark.parametrize("name,params,features", [("resnet18", 11_176_512, 512),
                                                  ("resnet50", 23_508_032, 2048)])
def test_resnet_full_size_on_the_meta_device(name, params, features):
    """torchvision's published sizes (11,689,512 and 25,557,032) less the 1000-class fc."""
    with torch.device("meta"):
        bb = create_backbone(name, weights="random").eval()
        out = bb(torch.empty(2, 3, 224, 224))
    assert sum(p.numel() for p in bb.parameters()) == params
    assert out.shape == (2, features) and bb.input_size == 224
    assert (bb.mean, bb.std) == (B.IMAGENET_MEAN, B.IMAGENET_STD)


def test_efficientnet_last_block_includes_conv_head(timm_models):
    bb = timm_models["efficientnet_b0"]
    freeze_backbone(bb, train_norm=(), unfreeze_last=1)
    assert bb.model.conv_head.weight.requires_grad
    assert not bb.model.blocks[-2][-1].conv_pw.weight.requires_grad


# --------------------------------------------------------------------------- freezing
def _all_backbones(timm_models):
    torch.manual_seed(0)
    return {**timm_models,
            "tiny_cnn": create_backbone("tiny_cnn", weights="random", patch_size=32),
            "tiny_vit": create_backbone("tiny_vit", weights="random"),
            "phikon": create_backbone("phikon", weights="random", vit_config=TINY_PHIKON),
            "phikon_v2": create_backbone("phikon_v2", weights="random", vit_config=TINY_DINOV2),
            "midnight": create_backbone("midnight", weights="random", vit_config=TINY_DINOV2),
            **{name: create_backbone(name, weights="random", vit_config=TINY_TIMM)
               for name in TIMM_VITS}}


def test_freeze_trains_exactly_the_norm_layers(timm_models):
    for name, bb in _all_backbones(timm_models).items():
        n = freeze_backbone(bb)
        _assert_trainable(bb, NORMS)
        assert n == count_trainable(bb) > 0, name
    # timm's own norm classes are subclasses and count as norms.
    eff, cnx = timm_models["efficientnet_b0"], timm_models["convnext_tiny"]
    assert any(type(m).__name__ == "BatchNormAct2d" and m.weight.requires_grad
               for m in eff.modules())
    assert any(type(m).__name__ == "LayerNorm2d" and m.weight.requires_grad for m in cnx.modules())


def test_freeze_norm_kinds_are_a_choice(timm_models):
    eff, cnx = timm_models["efficientnet_b0"], timm_models["convnext_tiny"]
    assert freeze_backbone(cnx, train_norm=("batchnorm",)) == 0  # ConvNeXt has no BatchNorm
    assert freeze_backbone(eff, train_norm="layernorm") == 0  # EfficientNet has no LayerNorm
    n_bn = freeze_backbone(eff, train_norm="batchnorm")
    _assert_trainable(eff, (nn.modules.batchnorm._BatchNorm,))
    assert n_bn == sum(p.numel() for m in eff.modules() if isinstance(m, nn.BatchNorm2d)
                       for p in m.parameters(recurse=False))
    assert freeze_backbone(eff, train_norm="none") == 0
    with pytest.raises(KitError, match="instancenorm"):
        freeze_backbone(eff, train_norm=("instancenorm",))


def test_unfreeze_last_opens_the_last_blocks(timm_models):
    for name, bb in _all_backbones(timm_models).items():
        blocks = bb.blocks()
        assert len(blocks) >= 2, name
        counts = []
        for n_open in (0, 1, 2):
            opened = {id(p) for block in blocks[len(blocks) - n_open:] for p in block.parameters()}
            counts.append(freeze_backbone(bb, unfreeze_last=n_open))
            _assert_trainable(bb, NORMS, opened)
        assert counts[0] < counts[1] < counts[2], name
        assert freeze_backbone(bb, train_norm=(), unfreeze_last=len(blocks)) == count_trainable(bb)
        with pytest.raises(KitError, match="unfreeze_last"):
            freeze_backbone(bb, unfreeze_last=len(blocks) + 1)
        with pytest.raises(KitError, match="unfreeze_last"):
            freeze_backbone(bb, unfreeze_last=-1)


def test_count_trainable():
    lin = nn.Linear(3, 2)
    assert count_trainable(lin) == 8
    lin.bias.requires_grad_(False)
    assert count_trainable(lin) == 6


# --------------------------------------------------------------------------- AdaBN
def _patch_array(seed=0, n=8, k=4, size=32):
    """uint8 N x K x P x P x 3 patches with texture and a colour cast per image."""
    rng = np.random.default_rng(seed)
    arr = rng.normal(160, 40, (n, k, size, size, 3)) + rng.normal(0, 30, (n, 1, 1, 1, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _features(bb, arr):
    from kit.models.normalize import normalize_batch

    x = normalize_batch(torch.from_numpy(arr.reshape(-1, *arr.shape[2:])), bb.mean, bb.std,
                        bb.input_size)
    with torch.no_grad():
        return bb(x)


def test_recalibrate_batchnorm_lifts_random_efficientnet_embeddings():
    torch.manual_seed(0)
    bb = create_backbone("efficientnet_b0", weights="random", patch_size=32).eval()
    freeze_backbone(bb, train_norm=())
    arr = _patch_array()
    params = {n: p.detach().clone() for n, p in bb.named_parameters()}
    before = _features(bb, arr).abs().mean().item()
    n = B.recalibrate_batchnorm(bb, arr, batch_size=8)
    after = _features(bb, arr)
    assert n == 32 and not bb.training
    assert before < 1e-3  # the collapse the issue measured (~1e-5 and below)
    assert 0.1 < after.abs().mean().item() < 1e3 and torch.isfinite(after).all()
    assert after.std(0).mean() > 0.1  # and the patches differ from each other
    assert all(torch.equal(p, params[n]) for n, p in bb.named_parameters())  # no weight moved
    assert all(not p.requires_grad for p in bb.parameters())


def test_recalibrate_batchnorm_statistics_match_the_data():
    from kit.models.normalize import normalize_batch

    torch.manual_seed(0)
    bb = create_backbone("tiny_cnn", weights="random", patch_size=32)
    arr = _patch_array(seed=1)
    momentum = bb.features[0][1].momentum
    # one batch holding every patch: the first BatchNorm sees exactly the conv outputs
    assert B.recalibrate_batchnorm(bb, arr, batch_size=32) == 32
    x = normalize_batch(torch.from_numpy(arr.reshape(-1, 32, 32, 3)), bb.mean, bb.std, 32)
    bn_inputs = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, i=i: bn_inputs.__setitem__(i, inp[0]))
             for i, m in enumerate(b[1] for b in bb.features)]
    with torch.no_grad():
        conv = bb.features[0][0](x)
        bb(x)  # eval mode: every BatchNorm now normalises its input over the data to ~0 / ~1
    for h in hooks:
        h.remove()
    bn0 = bb.features[0][1]
    assert torch.allclose(bn0.running_mean, conv.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn0.running_var, conv.var((0, 2, 3), unbiased=True), rtol=1e-4)
    assert bn0.momentum == momentum  # restored
    for i, block in enumerate(bb.features):
        bn, z = block[1], bn_inputs[i]
        normed = (z - bn.running_mean[None, :, None, None]) / \
            (bn.running_var[None, :, None, None] + bn.eps).sqrt()
        assert normed.mean((0, 2, 3)).abs().max() < 0.05, i
        assert (normed.std((0, 2, 3)) - 1).abs().max() < 0.05, i


def test_recalibrate_batchnorm_is_deterministic_and_respects_rows_and_max_batches():
    arr = _patch_array(seed=2, n=10)
    stats = []
    for _ in range(2):
        torch.manual_seed(0)
        bb = create_backbone("tiny_cnn", weights="random", patch_size=32)
        n = B.recalibrate_batchnorm(bb, arr, rows=[1, 3, 5, 7], batch_size=6, max_batches=2)
        stats.append({k: v.clone() for k, v in bb.state_dict().items() if "running" in k})
    assert n == 12  # 2 batches of 6 patches, spread over the 4 images
    assert all(torch.equal(stats[0][k], stats[1][k]) for k in stats[0])
    torch.manual_seed(0)
    other = create_backbone("tiny_cnn", weights="random", patch_size=32)
    B.recalibrate_batchnorm(other, arr, rows=[0, 2], batch_size=6)
    assert not torch.equal(other.features[0][1].running_mean, stats[0]["features.0.1.running_mean"])


def test_recalibrate_batchnorm_edge_cases():
    vit = create_backbone("tiny_vit", weights="random")
    assert B.recalibrate_batchnorm(vit, _patch_array(size=16)) == 0  # no BatchNorm: no-op
    bb = create_backbone("tiny_cnn", weights="random", patch_size=32)
    with pytest.raises(KitError, match="uint8 N x K x P x P x 3"):
        B.recalibrate_batchnorm(bb, _patch_array().astype(np.float32))
    with pytest.raises(KitError, match="batch_size"):
        B.recalibrate_batchnorm(bb, _patch_array(), batch_size=0)
    with pytest.raises(KitError, match="no patches"):
        B.recalibrate_batchnorm(bb, _patch_array(), rows=[])
    # 33 patches in batches of 32 would leave a batch of 1: split evenly instead
    arr = _patch_array(n=11, k=3)
    assert B.recalibrate_batchnorm(create_backbone("efficientnet_b0", weights="random",
                                                   patch_size=32), arr, batch_size=32) == 33
