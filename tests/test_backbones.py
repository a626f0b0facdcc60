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
TIMM_VITS = ("uni", "h_optimus_0", "virchow2")


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
    expected = {"efficientnet_b0", "convnext_tiny", "phikon", "tiny_cnn", "tiny_vit",
                "phikon_v2", "uni", "h_optimus_0", "virchow2"}
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
            "phikon": create_backbone("phikon", weights="random", vit_config=TINY_PHIKON),
            "phikon_v2": create_backbone("phikon_v2", weights="random", vit_config=TINY_DINOV2),
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


# --------------------------------------------------------------------------- foundation models
def _tiny_timm(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return create_backbone(name, weights="random", vit_config=TINY_TIMM, **kwargs).eval()


def test_foundation_model_table_records_size_and_normalisation():
    specs = B.FOUNDATION_MODELS
    assert set(specs) == {"phikon", "phikon_v2", "uni", "h_optimus_0", "virchow2"}
    assert all(spec.input_size == 224 for spec in specs.values())
    assert specs["h_optimus_0"].mean == (0.707223, 0.578729, 0.703617)
    assert specs["h_optimus_0"].std == (0.211883, 0.230117, 0.177517)
    assert all(specs[n].mean == B.IMAGENET_MEAN for n in ("phikon_v2", "uni", "virchow2"))
    assert {n for n, spec in specs.items() if spec.gated} == set(TIMM_VITS)


@pytest.mark.parametrize("name,patch,prefix,features", [
    ("uni", 16, 1, 32), ("h_optimus_0", 14, 5, 32), ("virchow2", 14, 5, 64)])
def test_timm_foundation_models_tiny(name, patch, prefix, features):
    bb = _tiny_timm(name)
    spec = B.FOUNDATION_MODELS[name]
    assert isinstance(bb, B.TimmViTBackbone) and bb.weights_source == "random"
    assert (bb.input_size, bb.mean, bb.std) == (224, spec.mean, spec.std)
    assert bb.model.patch_embed.patch_size == (patch, patch)
    assert bb.model.num_prefix_tokens == prefix  # CLS + 4 register tokens for the DINOv2 pair
    if prefix > 1:
        assert bb.model.reg_token.shape == (1, 4, 32)
    # LayerScale everywhere (init_values=1e-5 on the cards), SwiGLU + SiLU where the card says
    assert all(blk.ls1.gamma.shape == (32,) for blk in bb.model.blocks)
    if spec.swiglu or name == "h_optimus_0":
        from timm.layers import GluMlp

        mlp = bb.model.blocks[0].mlp
        assert isinstance(mlp, GluMlp) and isinstance(mlp.act, nn.SiLU)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = bb(x)
        tokens = bb.model.forward_features(x)
    assert out.shape == (2, features) and bb.num_features == features
    assert tokens.shape[1] == prefix + (224 // patch) ** 2
    if name != "virchow2":  # the CLS token after the final norm
        assert torch.allclose(out, tokens[:, 0], atol=1e-6)


def test_virchow2_embedding_is_cls_and_mean_of_patch_tokens():
    bb = _tiny_timm("virchow2")
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        out = bb(x)
        tokens = bb.model.forward_features(x)  # B x (1 + 4 + 256) x 32
    assert tokens.shape == (3, 261, 32)
    assert torch.allclose(out[:, :32], tokens[:, 0], atol=1e-6)
    assert torch.allclose(out[:, 32:], tokens[:, 5:].mean(1), atol=1e-6)
    # the register tokens are not averaged in
    assert not torch.allclose(out[:, 32:], tokens[:, 1:].mean(1), atol=1e-4)


@pytest.mark.parametrize("name", TIMM_VITS)
def test_timm_foundation_models_load_weights(backbones_offline, tmp_path, name):
    spec = B.FOUNDATION_MODELS[name]
    src = _tiny_timm(name, seed=4)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = src(x)
    # the layout `hf download <repo>` gives: pytorch_model.bin (timm's state dict)
    folder = tmp_path / "download"
    folder.mkdir()
    torch.save(src.model.state_dict(), folder / "pytorch_model.bin")
    bb = create_backbone(name, weights=folder, vit_config=TINY_TIMM).eval()
    assert bb.weights_source == f"local:{folder.resolve()}"
    assert _same_weights(bb.model, src.model)
    with torch.no_grad():
        assert torch.allclose(bb(x), ref, atol=1e-6)
    # a state dict saved from the kit's wrapper (keys under "model.") loads the same
    save_file(src.state_dict(), str(tmp_path / "wrapped.safetensors"))
    assert _same_weights(create_backbone(name, weights=tmp_path / "wrapped.safetensors",
                                         vit_config=TINY_TIMM).model, src.model)
    # auto: $KIT_WEIGHTS_DIR/<name>, then the Hugging Face cache of the repository
    shutil.copytree(folder, backbones_offline / "weights" / name)
    auto = create_backbone(name, vit_config=TINY_TIMM)
    assert auto.weights_source.startswith("local:") and _same_weights(auto.model, src.model)
    shutil.rmtree(backbones_offline / "weights" / name)
    _fake_hf_cache(backbones_offline, spec.repo,
                   {"pytorch_model.bin": folder / "pytorch_model.bin"})
    cached = create_backbone(name, vit_config=TINY_TIMM)
    assert cached.weights_source == f"hf-cache:{spec.repo}"
    assert _same_weights(cached.model, src.model)
    # the same file into the full-size architecture: refused, never half-random
    with pytest.raises(KitError, match="do not fit"):
        create_backbone(name, weights=folder, vit_config={**TINY_TIMM, "depth": 3})


def test_timm_foundation_models_interpolate_mode_and_bad_options():
    bb = _tiny_timm("h_optimus_0", phikon_mode="interpolate", patch_size=112)
    assert bb.input_size == 112 and bb(torch.randn(1, 3, 112, 112)).shape == (1, 32)
    uni = _tiny_timm("uni", phikon_mode="interpolate", patch_size=128)
    assert uni.input_size == 128 and uni(torch.randn(1, 3, 128, 128)).shape == (1, 32)
    with pytest.raises(KitError, match="divisible by the ViT patch size 14"):
        _tiny_timm("virchow2", phikon_mode="interpolate", patch_size=128)
    with pytest.raises(KitError, match="phikon_mode"):
        _tiny_timm("uni", phikon_mode="crop")
    with pytest.raises(KitError, match="'embed_dimm'.*VisionTransformer"):
        create_backbone("uni", weights="random", vit_config={"embed_dimm": 8})


def test_timm_foundation_models_freeze_keeps_norms_and_opens_last_block():
    bb = _tiny_timm("virchow2")
    freeze_backbone(bb)
    _assert_trainable(bb, NORMS)  # LayerNorms only: not LayerScale, tokens or embeddings
    assert not bb.model.blocks[0].ls1.gamma.requires_grad and not bb.model.reg_token.requires_grad
    freeze_backbone(bb, train_norm=(), unfreeze_last=1)
    assert bb.model.norm.weight.requires_grad  # the final norm belongs to the last block
    assert all(p.requires_grad for p in bb.model.blocks[-1].parameters())
    assert not any(p.requires_grad for p in bb.model.blocks[0].parameters())


def _tiny_dinov2(seed=0):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(**{**B.PHIKON_V2_CONFIG, **TINY_DINOV2})
    return Dinov2Model(config).eval()


@pytest.mark.parametrize("name,params_m,features,depth", [
    ("phikon_v2", 303, 1024, 24), ("uni", 303, 1024, 24), ("h_optimus_0", 1135, 1536, 40),
    ("virchow2", 631, 2560, 32)])
def test_full_size_architectures_match_the_model_cards(name, params_m, features, depth):
    """Parameter counts as published (ViT-L 303 M, H-optimus-0 1.1 B, Virchow2 632 M), built
    on the meta device: the real shapes without allocating gigabytes."""
    with torch.device("meta"):
        bb = create_backbone(name, weights="random").eval()
        out = bb(torch.empty(2, 3, 224, 224))
    n = sum(p.numel() for p in bb.parameters()) / 1e6
    assert abs(n - params_m) / params_m < 0.01, n
    assert out.shape == (2, features) == (2, bb.num_features)
    assert bb.input_size == 224 and len(bb.blocks()) == depth
    if name == "phikon_v2":
        assert type(bb.model).__name__ == "Dinov2Model"
        assert bb.model.config.patch_size == 16


def test_phikon_v2_loads_a_save_pretrained_folder(backbones_offline, tmp_path):
    ref = _tiny_dinov2(seed=5)
    ref.save_pretrained(tmp_path / "pv2")
    bb = create_backbone("phikon_v2", weights=tmp_path / "pv2").eval()
    assert isinstance(bb, B.Dinov2Backbone) and _same_weights(bb.model, ref)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(bb(x), ref(pixel_values=x).last_hidden_state[:, 0], atol=1e-6)
    # DINOv2 resamples its position embeddings itself: 128 px patches fed as they are
    small = create_backbone("phikon_v2", weights=tmp_path / "pv2", phikon_mode="interpolate",
                            patch_size=128).eval()
    assert small.input_size == 128 and small(torch.randn(1, 3, 128, 128)).shape == (1, 32)
    _fake_hf_cache(backbones_offline, "owkin/phikon-v2",
                   {f: tmp_path / "pv2" / f for f in ("config.json", "model.safetensors")})
    cached = create_backbone("phikon_v2")
    assert cached.weights_source == "hf-cache:owkin/phikon-v2" and _same_weights(cached.model, ref)


def test_phikon_v2_loads_transformers_4_key_names(tmp_path):
    """owkin/phikon-v2 was saved with transformers 4.40 (attention.attention.query...)."""
    ref = _tiny_dinov2(seed=6)
    renames = {"attention.q_proj": "attention.attention.query",
               "attention.k_proj": "attention.attention.key",
               "attention.v_proj": "attention.attention.value",
               "attention.o_proj": "attention.output.dense"}
    old = {}
    for key, value in ref.state_dict().items():
        for new, before in renames.items():
            key = key.replace(new, before)
        old[key] = value.contiguous()
    assert any("attention.attention.query" in k for k in old)
    ref.config.save_pretrained(tmp_path / "old")
    save_file(old, str(tmp_path / "old" / "model.safetensors"))
    bb = create_backbone("phikon_v2", weights=tmp_path / "old")
    assert _same_weights(bb.model, ref)


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
