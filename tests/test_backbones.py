"""Backbone registry, factories, each model's weight loading, freezing and AdaBN (the
``--weights`` lookup itself: test_weights.py)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from kit.models import backbones as B
from kit.models.backbones import registry
from kit.models.backbones import count_trainable, create_backbone, freeze_backbone, list_backbones
from kit.models.heads import PatchClassifier, create_head
from kit.utils import KitError

NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
TINY_PHIKON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                   intermediate_size=64, image_size=224, patch_size=16)
# Tiny versions of the foundation models: same code path, same architecture family and
# options (registers, SwiGLU, LayerScale, pooling), only narrower and shallower.
TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
TINY_TIMM = dict(embed_dim=32, depth=2, num_heads=2)
# The timm foundation models (their builder, weights lookup and freezing are shared).
TIMM_VITS = ("uni", "uni2_h", "h_optimus_0", "h_optimus_1", "virchow2", "gigapath")
RESNETS = ("resnet18", "resnet50")


@pytest.fixture(autouse=True)
def backbones_offline(monkeypatch, tmp_path):
    """No test may reach the network or a real cache: empty caches, HF_HUB_OFFLINE=1."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("KIT_WEIGHTS_DIR", str(tmp_path / "weights"))
    (tmp_path / "weights").mkdir()
    return tmp_path


@pytest.fixture(scope="module", autouse=True)
def backbones_one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine OpenMP
    threads spinning against other processes made the file several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def timm_models():
    """The real timm CNNs, random weights, built once (a few seconds each)."""
    torch.manual_seed(0)
    return {name: create_backbone(name, weights="random", patch_size=64)
            for name in ("efficientnet_b0", "convnext_tiny", *RESNETS)}


def _tiny_vit_model(seed=0, **overrides):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    return ViTModel(ViTConfig(**{**TINY_PHIKON, **overrides}), add_pooling_layer=False).eval()


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _fake_hf_cache(root, repo, files):
    """A Hugging Face hub cache holding ``files`` (name -> source path) for ``repo``."""
    repo_dir = root / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for name, src in files.items():
        shutil.copy(src, snap / name)
    return snap


# --------------------------------------------------------------------------- registry
def test_registry_lists_the_backbones():
    expected = {"efficientnet_b0", "convnext_tiny", "resnet18", "resnet50", "phikon", "tiny_cnn",
                "tiny_vit", "phikon_v2", "midnight", "uni", "uni2_h", "h_optimus_0",
                "h_optimus_1", "virchow2", "gigapath"}
    assert expected <= set(list_backbones())
    assert list_backbones() == sorted(list_backbones())


def test_register_backbone_adds_a_builder(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_INFO", dict(registry._INFO))

    @B.register_backbone("my_cnn")
    def build(weights, patch_size, phikon_mode, vit_config):
        model = B.TinyCNN(patch_size, widths=(8,))
        model.name = "my_cnn"
        return model

    assert "my_cnn" in list_backbones()
    bb = create_backbone("my_cnn", weights="random", patch_size=32)
    assert bb.num_features == 8 and bb(torch.zeros(1, 3, 32, 32)).shape == (1, 8)
    with pytest.raises(ValueError, match="twice"):
        B.register_backbone("my_cnn")(build)


def test_native_size_and_the_default_patch_size():
    """patch_size None = the size the backbone was pretrained at, with no config file read."""
    assert registry.CNN_NATIVE_SIZE == 224
    for name in list_backbones():
        info = B.backbone_info(name)
        assert B.native_size(name) == (info.input_size or 224), name
    assert create_backbone("tiny_cnn", weights="random").input_size == 224
    assert create_backbone("tiny_cnn", weights="random", patch_size=None).input_size == 224
    assert create_backbone("tiny_vit", weights="random", phikon_mode="interpolate").input_size == 224
    with pytest.raises(KitError, match="unknown backbone 'nope'"):
        B.native_size("nope")


def test_create_backbone_reads_no_configuration(monkeypatch):
    import kit.config

    def refuse(*args, **kwargs):
        raise AssertionError("create_backbone must not read kit/conf")

    monkeypatch.setattr(kit.config, "load_config", refuse)
    assert create_backbone("tiny_cnn", weights="random").num_features == 64


def test_describe_backbones_lists_size_and_gating():
    lines = {line.split(" ")[0]: line for line in B.describe_backbones()}
    assert set(lines) == set(list_backbones())
    for name in ("uni2_h", "h_optimus_1", "gigapath"):
        assert lines[name].startswith(f"{name} (224 px, gated weights)"), lines[name]
    assert lines["midnight"].startswith("midnight (224 px)") and "gated" not in lines["midnight"]
    assert lines["resnet18"].startswith("resnet18 (CNN, at the patch size)")
    assert "kaiko-ai/midnight" in lines["midnight"]
    assert set(B.vit_backbones()) == {n for n in list_backbones() if B.backbone_info(n).input_size}


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(KitError) as err:
        create_backbone("resnet9000")
    msg = str(err.value)
    assert "resnet9000" in msg and all(name in msg for name in list_backbones())


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(KitError, match="unknown option"):
        create_backbone("tiny_cnn", weights="random", patchsize=64)
    with pytest.raises(KitError, match="patch_size"):
        create_backbone("tiny_cnn", weights="random", patch_size="128")
    with pytest.raises(KitError, match="not found"):
        create_backbone("tiny_cnn", weights=str(tmp_path / "nope.safetensors"))
    with pytest.raises(KitError, match="phikon_mode"):
        create_backbone("tiny_vit", weights="random", phikon_mode="crop")
    with pytest.raises(KitError, match="vit_config"):
        create_backbone("tiny_cnn", weights="random", vit_config={"hidden_size": 8})
    with pytest.raises(KitError, match="ViTConfig field"):
        create_backbone("tiny_vit", weights="random", vit_config={"hiden_size": 8})


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
    assert not any(p.requires_grad for p in m.layer2.parameters()) and not m.conv1.weight.requires_grad
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


def _assert_trainable(bb, norm_types, open_params=frozenset()):
    """Every parameter trains iff it belongs to a norm layer of ``norm_types`` or is opened."""
    for mod_name, module in bb.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            expected = bool(norm_types) and isinstance(module, norm_types) or id(p) in open_params
            where = f"{bb.name}: {mod_name}.{p_name} ({type(module).__name__})"
            assert p.requires_grad == expected, where


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


# --------------------------------------------------------------------------- phikon / ViT path
def test_phikon_loads_a_save_pretrained_folder_in_both_modes(tmp_path):
    vit = _tiny_vit_model()
    vit.save_pretrained(tmp_path / "phikon_tiny")
    x224 = torch.randn(2, 3, 224, 224)
    x128 = torch.randn(2, 3, 128, 128)

    bb = create_backbone("phikon", weights=tmp_path / "phikon_tiny", phikon_mode="resize",
                         patch_size=128).eval()
    assert bb.weights_source == f"local:{(tmp_path / 'phikon_tiny').resolve()}"
    assert _same_weights(bb.model, vit)
    assert (bb.num_features, bb.input_size) == (32, 224)
    with torch.no_grad():
        assert torch.allclose(bb(x224), vit(pixel_values=x224).last_hidden_state[:, 0])

    bb = create_backbone("phikon", weights=tmp_path / "phikon_tiny", phikon_mode="interpolate",
                         patch_size=128).eval()
    assert bb.input_size == 128
    with torch.no_grad():
        out = bb(x128)
        ref = vit(pixel_values=x128, interpolate_pos_encoding=True).last_hidden_state[:, 0]
    assert out.shape == (2, 32) and torch.allclose(out, ref)
    with pytest.raises(KitError, match="divisible"):
        create_backbone("phikon", weights=tmp_path / "phikon_tiny", phikon_mode="interpolate",
                        patch_size=100)


def test_phikon_takes_normalisation_from_preprocessor_config(tmp_path):
    folder = tmp_path / "phikon_tiny"
    _tiny_vit_model().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.1]}))
    bb = create_backbone("phikon", weights=folder)
    assert bb.mean == (0.5, 0.4, 0.3) and bb.std == (0.2, 0.2, 0.1)


def test_phikon_loads_a_bare_state_dict_file_with_a_config_override(tmp_path):
    vit = _tiny_vit_model(seed=3)
    save_file(vit.state_dict(), str(tmp_path / "weights.safetensors"))
    bb = create_backbone("phikon", weights=tmp_path / "weights.safetensors", vit_config=TINY_PHIKON)
    assert _same_weights(bb.model, vit)
    # Without the override the file is loaded into a ViT-B/16: it does not fit, no random fill-in.
    with pytest.raises(KitError, match="do not fit"):
        create_backbone("phikon", weights=tmp_path / "weights.safetensors")


def test_phikon_refuses_weights_that_do_not_fit(tmp_path):
    _tiny_vit_model().save_pretrained(tmp_path / "phikon_tiny")
    with pytest.raises(KitError, match="do not fit"):
        create_backbone("phikon", weights=tmp_path / "phikon_tiny",
                        vit_config={"num_hidden_layers": 4})


def test_tiny_vit_follows_the_phikon_code_path(tmp_path):
    bb = create_backbone("tiny_vit")
    assert bb.weights_source.startswith("random") and "no pretrained weights" in bb.weights_source
    bb.model.save_pretrained(tmp_path / "tv")
    again = create_backbone("tiny_vit", weights=tmp_path / "tv", phikon_mode="interpolate",
                            patch_size=64)
    assert _same_weights(again.model, bb.model) and again.input_size == 64
    assert again(torch.randn(3, 3, 64, 64)).shape == (3, bb.num_features)


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
