"""Backbone registry, factories, weight loading (local, caches, offline message) and freezing."""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from kit import backbones as B
from kit.backbones import count_trainable, create_backbone, freeze_backbone, list_backbones
from kit.heads import PatchClassifier, create_head
from kit.utils import KitError

NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
TINY_PHIKON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                   intermediate_size=64, image_size=224, patch_size=16)


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
    """The two real timm backbones, random weights, built once (a few seconds each)."""
    torch.manual_seed(0)
    return {name: create_backbone(name, weights="random", patch_size=64)
            for name in ("efficientnet_b0", "convnext_tiny")}


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
    expected = {"efficientnet_b0", "convnext_tiny", "phikon", "tiny_cnn", "tiny_vit"}
    assert expected <= set(list_backbones())
    assert list_backbones() == sorted(list_backbones())


def test_register_backbone_adds_a_builder(monkeypatch):
    monkeypatch.setattr(B, "_REGISTRY", dict(B._REGISTRY))

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
@pytest.mark.parametrize("name", ["efficientnet_b0", "convnext_tiny"])
def test_timm_backbone_forward_and_one_training_step(timm_models, name):
    bb = timm_models[name]
    assert bb.weights_source == "random"
    assert bb.input_size == 64  # CNNs take the patches at the patch size
    assert bb.mean == B.IMAGENET_MEAN and bb.std == B.IMAGENET_STD
    assert bb.num_features == {"efficientnet_b0": 1280, "convnext_tiny": 768}[name]
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
            "phikon": create_backbone("phikon", weights="random", vit_config=TINY_PHIKON)}


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


def test_phikon_auto_uses_kit_weights_dir(backbones_offline):
    vit = _tiny_vit_model(seed=1)
    vit.save_pretrained(backbones_offline / "weights" / "phikon")
    bb = create_backbone("phikon")  # weights="auto"
    assert bb.weights_source.startswith("local:") and bb.weights_source.endswith("phikon")
    assert _same_weights(bb.model, vit)


def test_phikon_auto_uses_the_hf_cache(backbones_offline, tmp_path):
    vit = _tiny_vit_model(seed=2)
    vit.save_pretrained(tmp_path / "src")
    _fake_hf_cache(backbones_offline, "owkin/phikon",
                   {f: tmp_path / "src" / f for f in ("config.json", "model.safetensors")})
    bb = create_backbone("phikon")
    assert bb.weights_source == "hf-cache:owkin/phikon"
    assert _same_weights(bb.model, vit)


def test_tiny_vit_follows_the_phikon_code_path(tmp_path):
    bb = create_backbone("tiny_vit")
    assert bb.weights_source.startswith("random") and "no pretrained weights" in bb.weights_source
    bb.model.save_pretrained(tmp_path / "tv")
    again = create_backbone("tiny_vit", weights=tmp_path / "tv", phikon_mode="interpolate",
                            patch_size=64)
    assert _same_weights(again.model, bb.model) and again.input_size == 64
    assert again(torch.randn(3, 3, 64, 64)).shape == (3, bb.num_features)


# --------------------------------------------------------------------------- other weight paths
def test_timm_weights_from_file_folder_and_cache(backbones_offline, tmp_path):
    import timm

    torch.manual_seed(5)
    src = timm.create_model("efficientnet_b0", pretrained=False)  # with its 1000-class classifier
    save_file(src.state_dict(), str(tmp_path / "eff.safetensors"))
    expected = {k: v for k, v in src.state_dict().items() if not k.startswith("classifier.")}

    bb = create_backbone("efficientnet_b0", weights=tmp_path / "eff.safetensors")
    assert bb.weights_source == f"local:{tmp_path / 'eff.safetensors'}"
    assert bb.model.state_dict().keys() == expected.keys()
    assert all(torch.equal(bb.model.state_dict()[k], v) for k, v in expected.items())

    _fake_hf_cache(backbones_offline, "timm/efficientnet_b0.ra_in1k",
                   {"model.safetensors": tmp_path / "eff.safetensors"})
    bb = create_backbone("efficientnet_b0")
    assert bb.weights_source == "hf-cache:timm/efficientnet_b0.ra_in1k"
    assert torch.equal(bb.model.conv_stem.weight, src.conv_stem.weight)

    with pytest.raises(KitError, match="do not fit"):
        create_backbone("efficientnet_b0", weights=_tiny_cnn_file(tmp_path))


def _tiny_cnn_file(tmp_path):
    path = tmp_path / "tiny" / "model.safetensors"
    path.parent.mkdir(exist_ok=True)
    torch.manual_seed(7)
    save_file(create_backbone("tiny_cnn", weights="random").state_dict(), str(path))
    return path.parent


def test_tiny_cnn_loads_its_own_state_dict(tmp_path):
    folder = _tiny_cnn_file(tmp_path)
    torch.manual_seed(7)
    ref = create_backbone("tiny_cnn", weights="random")
    bb = create_backbone("tiny_cnn", weights=folder)
    assert _same_weights(bb, ref) and bb.weights_source.startswith("local:")
    torch.save(ref.state_dict(), tmp_path / "tiny.pth")
    assert _same_weights(create_backbone("tiny_cnn", weights=tmp_path / "tiny.pth"), ref)
    auto = create_backbone("tiny_cnn")
    assert "no pretrained weights" in auto.weights_source
    (tmp_path / "empty").mkdir()
    with pytest.raises(KitError, match="no weight file"):
        create_backbone("tiny_cnn", weights=tmp_path / "empty")


@pytest.mark.parametrize("name", ["phikon", "efficientnet_b0", "convnext_tiny"])
def test_offline_without_weights_is_one_clear_error(backbones_offline, name):
    start = time.monotonic()
    with pytest.raises(KitError) as err:
        create_backbone(name)  # weights="auto", nothing anywhere, HF_HUB_OFFLINE=1
    assert time.monotonic() - start < 10  # no network wait
    msg = str(err.value)
    assert str(backbones_offline / "weights" / name) in msg  # the local dir
    assert str(backbones_offline / "hf" / "hub") in msg  # the HF cache
    assert "HF_HUB_OFFLINE" in msg and "hf download" in msg and "--weights" in msg
    assert "\n" not in msg
    if name == "efficientnet_b0":  # also has a torch-hub URL (convnext_tiny is on the HF hub only)
        assert str(backbones_offline / "torch" / "hub" / "checkpoints") in msg
