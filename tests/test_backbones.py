"""Backbone registry and factory (kit.models.backbones.registry), the transformers ViT path
(phikon, tiny_vit), and the fixtures and helpers the other backbone test files share
(test_backbones_freeze.py: freezing, AdaBN, timm CNNs; test_backbones_foundation.py: the
foundation models; test_weights.py: the ``--weights`` lookup)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kit.models import backbones as B
from kit.models.backbones import create_backbone, list_backbones, registry
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
    assert create_backbone("tiny_vit", weights="random",
                           phikon_mode="interpolate").input_size == 224
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
    with pytest.raises(KitError, match="unknown backbone 'resnet9000'; known backbones") as err:
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


# --------------------------------------------------------------------------- helpers
def _assert_trainable(bb, norm_types, open_params=frozenset()):
    """Every parameter trains iff it belongs to a norm layer of ``norm_types`` or is opened."""
    for mod_name, module in bb.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            expected = bool(norm_types) and isinstance(module, norm_types) or id(p) in open_params
            where = f"{bb.name}: {mod_name}.{p_name} ({type(module).__name__})"
            assert p.requires_grad == expected, where


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
