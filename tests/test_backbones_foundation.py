"""Pathology foundation models (kit.models.backbones.foundation and the transformers ones of
hf_vit): each card's architecture on tiny random versions, embeddings, weight loading, and
the full-size parameter counts on the meta device (no real weights allocated)."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import test_backbones
from kit.models import backbones as B
from kit.models.backbones import create_backbone, freeze_backbone
from kit.utils import KitError
from test_backbones import (
    NORMS,
    TIMM_VITS,
    TINY_DINOV2,
    TINY_TIMM,
    _assert_trainable,
    _fake_hf_cache,
    _same_weights,
)

# test_backbones' autouse fixtures, bound here so that they apply to this file too: empty
# caches, HF_HUB_OFFLINE=1, one intra-op thread.
backbones_offline = test_backbones.backbones_offline
backbones_one_thread = test_backbones.backbones_one_thread


def _tiny_timm(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return create_backbone(name, weights="random", vit_config=TINY_TIMM, **kwargs).eval()


def test_foundation_model_table_records_size_and_normalisation():
    specs = B.FOUNDATION_MODELS
    assert set(specs) == {"phikon", "phikon_v2", "midnight", *TIMM_VITS}
    assert set(B.TIMM_FOUNDATION_MODELS) == set(TIMM_VITS)
    assert all(spec.input_size == 224 for spec in specs.values())
    for name in ("h_optimus_0", "h_optimus_1"):
        assert specs[name].mean == (0.707223, 0.578729, 0.703617)
        assert specs[name].std == (0.211883, 0.230117, 0.177517)
    assert all(specs[n].mean == B.IMAGENET_MEAN and specs[n].std == B.IMAGENET_STD
               for n in ("phikon_v2", "uni", "uni2_h", "virchow2", "gigapath"))
    assert specs["midnight"].mean == specs["midnight"].std == (0.5, 0.5, 0.5)
    assert {n for n, spec in specs.items() if spec.gated} == set(TIMM_VITS)
    assert specs["uni2_h"].repo == "MahmoodLab/UNI2-h"
    assert specs["h_optimus_1"].repo == "bioptimus/H-optimus-1"
    assert specs["midnight"].repo == "kaiko-ai/midnight"
    assert specs["gigapath"].repo == "prov-gigapath/prov-gigapath"
    for name, spec in specs.items():  # the registry says what the table says
        info = B.backbone_info(name)
        assert (info.input_size, info.gated) == (spec.input_size, spec.gated), name


@pytest.mark.parametrize("name,patch,prefix,features", [
    ("uni", 16, 1, 32), ("uni2_h", 14, 9, 32), ("h_optimus_0", 14, 5, 32),
    ("h_optimus_1", 14, 5, 32), ("virchow2", 14, 5, 64), ("gigapath", 16, 1, 32)])
def test_timm_foundation_models_tiny(name, patch, prefix, features):
    bb = _tiny_timm(name)
    spec = B.FOUNDATION_MODELS[name]
    assert isinstance(bb, B.TimmViTBackbone) and bb.weights_source == "random"
    assert (bb.input_size, bb.mean, bb.std) == (224, spec.mean, spec.std)
    assert bb.model.patch_embed.patch_size == (patch, patch)
    assert bb.model.num_prefix_tokens == prefix  # CLS + 4 register tokens (8 for UNI2-h)
    if prefix > 1:
        assert bb.model.reg_token.shape == (1, prefix - 1, 32)
    if name in ("uni2_h", "h_optimus_0", "h_optimus_1"):  # no_embed_class: patches only
        assert bb.model.pos_embed.shape == (1, (224 // patch) ** 2, 32)
    # LayerScale everywhere (init_values=1e-5 on the cards), SwiGLU + SiLU where the card says
    # (or timm's DINOv2 giant architecture has it: H-optimus, GigaPath)
    assert all(blk.ls1.gamma.shape == (32,) for blk in bb.model.blocks)
    if name != "uni":
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


def _tiny_dinov2(seed=0, base=None):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(**{**(base or B.PHIKON_V2_CONFIG), **TINY_DINOV2})
    return Dinov2Model(config).eval()


# Published sizes, in millions: ViT-L 303 (UNI, Phikon-v2 cards); UNI2-h 681 (its card);
# H-optimus-0 and -1 "1.1 B" (their cards; 1135 M as ViT-g/14 with 4 registers); Virchow2
# 632 M (its card); Midnight "1.1 B" (ViT-g/14, 1.14 B as LazySlide lists it); GigaPath tile
# encoder 1.13 B (Xu et al., 2024). The exact counts pin each architecture down.
FULL_SIZE = {
    "phikon_v2": (303, 1024, 24, None), "uni": (303, 1024, 24, None),
    "h_optimus_0": (1135, 1536, 40, 1_134_774_272), "virchow2": (631, 2560, 32, 631_239_424),
    "uni2_h": (681, 1536, 24, 681_394_176), "h_optimus_1": (1135, 1536, 40, 1_134_774_272),
    "midnight": (1140, 3072, 40, 1_134_771_200), "gigapath": (1130, 1536, 40, 1_134_953_984),
}


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_architectures_match_the_model_cards(name):
    """Built on the meta device: the real shapes without allocating gigabytes."""
    params_m, features, depth, exact = FULL_SIZE[name]
    with torch.device("meta"):
        bb = create_backbone(name, weights="random").eval()
        out = bb(torch.empty(2, 3, 224, 224))
    n = sum(p.numel() for p in bb.parameters())
    assert abs(n / 1e6 - params_m) / params_m < 0.01, n
    assert exact is None or n == exact
    assert out.shape == (2, features) == (2, bb.num_features)
    assert bb.input_size == 224 and len(bb.blocks()) == depth
    assert all(p.device.type == "meta" for p in bb.parameters())  # nothing allocated
    if name in ("phikon_v2", "midnight"):
        assert type(bb.model).__name__ == "Dinov2Model"
        assert bb.model.config.patch_size == {"phikon_v2": 16, "midnight": 14}[name]


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


# --------------------------------------------------------------------------- midnight
def test_midnight_tiny_embedding_is_cls_and_mean_of_patch_tokens():
    torch.manual_seed(0)
    bb = create_backbone("midnight", weights="random", vit_config=TINY_DINOV2).eval()
    assert isinstance(bb, B.Dinov2Backbone) and bb.pooling == "cls+mean"
    assert (bb.input_size, bb.mean, bb.std) == (224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert bb.model.config.use_swiglu_ffn and bb.model.config.patch_size == 14
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        out = bb(x)
        tokens = bb.model(pixel_values=x).last_hidden_state  # B x (1 + 256) x 32
    assert tokens.shape == (3, 257, 32) and out.shape == (3, 64) and bb.num_features == 64
    assert torch.allclose(out[:, :32], tokens[:, 0], atol=1e-6)
    assert torch.allclose(out[:, 32:], tokens[:, 1:].mean(1), atol=1e-6)
    small = create_backbone("midnight", weights="random", vit_config=TINY_DINOV2,
                            phikon_mode="interpolate", patch_size=112)
    assert small.input_size == 112 and small(torch.randn(1, 3, 112, 112)).shape == (1, 64)


def test_midnight_loads_its_hub_folder_with_the_card_normalisation(backbones_offline, tmp_path):
    ref = _tiny_dinov2(seed=7, base=B.MIDNIGHT_CONFIG)
    ref.save_pretrained(tmp_path / "mn")
    _fake_hf_cache(backbones_offline, "kaiko-ai/midnight",
                   {f: tmp_path / "mn" / f for f in ("config.json", "model.safetensors")})
    bb = create_backbone("midnight").eval()
    assert bb.weights_source == "hf-cache:kaiko-ai/midnight" and _same_weights(bb.model, ref)
    assert bb.mean == bb.std == (0.5, 0.5, 0.5)  # no preprocessor_config.json: the card's
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = ref(pixel_values=x).last_hidden_state
        assert torch.allclose(bb(x), torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1),
                              atol=1e-5)
    freeze_backbone(bb)
    _assert_trainable(bb, NORMS)


def test_midnight_feeds_the_cards_224_px_whatever_its_config_declares(tmp_path):
    """A DINOv2 config.json may keep Meta's 518 px pretraining crop; the card feeds 224."""
    ref = _tiny_dinov2(seed=8, base={**B.MIDNIGHT_CONFIG, "image_size": 518})
    ref.save_pretrained(tmp_path / "mn518")
    bb = create_backbone("midnight", weights=tmp_path / "mn518").eval()
    assert bb.model.config.image_size == 518 and bb.input_size == 224
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = ref(pixel_values=x).last_hidden_state
        assert tokens.shape[1] == 257  # position embeddings resampled to 16 x 16 patches
        assert torch.allclose(bb(x)[:, :32], tokens[:, 0], atol=1e-5)
