"""ViTs through transformers: phikon (``ViTModel``), phikon_v2 and midnight (``Dinov2Model``),
tiny_vit.

Pretrained weights are loaded with ``from_pretrained`` from a ``save_pretrained`` folder (a
Hugging Face download is one), or from a bare weight file with the architecture's default
``config.json``; tensors that do not fit are an error, never a random fill-in.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from kit.models.backbones.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    check_mode,
    group,
    side,
    vit_input_size,
)
from kit.models.backbones.foundation import FOUNDATION_MODELS, FoundationModel
from kit.models.backbones.registry import register_backbone
from kit.models.weights import find_pretrained, first_line, weight_file, weights_path
from kit.utils import KitError


class ViTBackbone(Backbone):
    """A transformers ``ViTModel``; the feature is the CLS token of the last hidden state.

    ``pooling="cls+mean"`` concatenates the CLS token with the mean of the patch tokens
    (Midnight's embedding; these models have no register tokens); ``num_features`` is then
    twice the width.
    """

    POOLINGS = ("cls", "cls+mean")

    def __init__(self, name: str, model: nn.Module, input_size: int, mean, std,
                 weights_source: str, pooling: str = "cls"):
        if pooling not in self.POOLINGS:
            raise ValueError(f"pooling must be one of {self.POOLINGS} (got {pooling!r})")
        width = model.config.hidden_size
        super().__init__(name, width * (2 if pooling == "cls+mean" else 1), input_size, mean,
                         std, weights_source)
        self.model = model
        self.pooling = pooling
        self._native = side(model.config.image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Position embeddings are for the native size; other sizes need interpolating them.
        interpolate = x.shape[-1] != self._native or x.shape[-2] != self._native
        out = self.model(pixel_values=x, interpolate_pos_encoding=interpolate)
        return self._pool(out.last_hidden_state)

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return tokens[:, 0]
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)

    def blocks(self) -> list[nn.Module]:
        layers = _vit_layers(self.model)
        layers[-1] = group(layers[-1], self.model.layernorm)
        return layers


class Dinov2Backbone(ViTBackbone):
    """A transformers ``Dinov2Model`` (phikon_v2: CLS token; midnight: CLS + mean of patches).

    DINOv2 interpolates its position embeddings for any input size by itself, so the
    forward takes no ``interpolate_pos_encoding`` flag.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._pool(self.model(pixel_values=x).last_hidden_state)


def _vit_layers(model: nn.Module) -> list[nn.Module]:
    # transformers >= 5 names them model.layers; 4.x had model.encoder.layer.
    layers = getattr(model, "layers", None)
    if layers is None:
        layers = model.encoder.layer
    return list(layers)


# transformers model families: config class, model class, extra model arguments, backbone.
_HF_FAMILIES = {
    "vit": ("ViTConfig", "ViTModel", {"add_pooling_layer": False}, ViTBackbone),
    "dinov2": ("Dinov2Config", "Dinov2Model", {}, Dinov2Backbone),
}
# State-dict keys a checkpoint may lack without harm: DINOv2's mask token is only used for
# masked-image pre-training, never in a forward pass on plain images.
_OPTIONAL_KEYS = ("embeddings.mask_token",)


def _hf_classes(family: str):
    import transformers

    config_cls, model_cls, model_kwargs, _ = _HF_FAMILIES[family]
    return getattr(transformers, config_cls), getattr(transformers, model_cls), model_kwargs


def _load_vit(name: str, path: Path | None, base: dict, overrides: dict, family: str = "vit",
              norm=(IMAGENET_MEAN, IMAGENET_STD)):
    """``(model, mean, std)``: random from ``base + overrides``, or loaded from ``path``.

    ``family`` is ``vit`` (``ViTModel``) or ``dinov2`` (``Dinov2Model``). Files and
    weights-only folders are linked into a temporary ``save_pretrained`` layout so that
    every load goes through ``from_pretrained`` (which also converts old key names).
    ``norm`` is the model card's ``(mean, std)``; a ``preprocessor_config.json`` beside the
    weights overrides it.
    """
    config_cls, model_cls, model_kwargs = _hf_classes(family)
    if path is None:
        return model_cls(_vit_config(name, config_cls(**base), overrides), **model_kwargs), *norm
    folder = path if path.is_dir() else path.parent
    mean, std = _preprocessor_norm(folder, norm)
    with tempfile.TemporaryDirectory(prefix="kit-vit-") as tmp:
        source = _pretrained_layout(name, path, Path(tmp), base, config_cls)
        config = _vit_config(name, config_cls.from_pretrained(source, local_files_only=True),
                             overrides)
        try:
            with _quiet_transformers():
                model, info = model_cls.from_pretrained(
                    source, config=config, local_files_only=True, output_loading_info=True,
                    **model_kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            if "mismatch" in str(exc):
                raise KitError(f"{name}: weights in {path} do not fit the model (tensors of "
                               "another shape: another architecture, or a wrong vit_config?)"
                               ) from None
            raise KitError(f"{name}: cannot load weights from {path}: {first_line(exc)}") \
                from None
    bad = sorted(k for k in info.get("missing_keys") or [] if not k.endswith(_OPTIONAL_KEYS))
    bad += sorted(info.get("mismatched_keys") or [])
    if bad:
        raise KitError(f"{name}: weights in {path} do not fit the model ({len(bad)} tensors "
                       f"missing or of another shape, e.g. {bad[0]}); refusing to train with "
                       "randomly initialised layers")
    return model, mean, std


@contextlib.contextmanager
def _quiet_transformers():
    """Silence from_pretrained's progress bars and load report; the kit checks the result."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _vit_config(name: str, config, overrides: dict):
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise KitError(f"{name}: vit_config key {key!r} is not a "
                           f"{type(config).__name__} field")
        setattr(config, key, value)
    return config


def _pretrained_layout(name: str, path: Path, tmp: Path, base: dict, config_cls=None) -> Path:
    """A folder with ``config.json`` and one weight file for ``from_pretrained``."""
    if path.is_dir() and (path / "config.json").is_file():
        return path
    weight = weight_file(name, path)
    folder = path if path.is_dir() else path.parent
    config = folder / "config.json"
    if config.is_file():
        (tmp / "config.json").symlink_to(config)
    else:
        if config_cls is None:
            from transformers import ViTConfig as config_cls
        config_cls(**base).save_pretrained(tmp)
    target = "model.safetensors" if weight.suffix == ".safetensors" else "pytorch_model.bin"
    (tmp / target).symlink_to(weight)
    return tmp


def _preprocessor_norm(folder: Path, default=(IMAGENET_MEAN, IMAGENET_STD)):
    """mean/std from a ``preprocessor_config.json`` beside the weights (``default`` otherwise)."""
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        try:
            cfg = json.loads(pre.read_text())
            if len(cfg["image_mean"]) == 3 and len(cfg["image_std"]) == 3:
                return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
        except (ValueError, KeyError, TypeError):
            raise KitError(f"{pre}: no 3-channel image_mean/image_std; fix or delete the file"
                           ) from None
    return default


def _vit_builder(name: str, spec: FoundationModel | None, base_config: dict, family: str = "vit"):
    """Builder of a transformers ViT; ``spec`` None: no pretrained weights (tiny_vit)."""
    norm = (spec.mean, spec.std) if spec else (IMAGENET_MEAN, IMAGENET_STD)
    pooling = spec.pooling if spec else "cls"

    def build(weights, patch_size, phikon_mode, vit_config) -> Backbone:
        check_mode(name, phikon_mode)
        path = weights_path(name, weights)
        if path is not None:
            source = f"local:{path}"
        elif str(weights) == "auto" and spec is not None:
            path, source = find_pretrained(name, spec.repo, need_config=True, gated=spec.gated)
        elif str(weights) == "auto":
            source = f"random ({name} has no pretrained weights)"
        else:
            source = "random"
        model, mean, std = _load_vit(name, path, base_config, vit_config or {}, family, norm)
        native, patch = side(model.config.image_size), side(model.config.patch_size)
        if family == "dinov2" and spec is not None:
            # DINOv2 resamples its position embeddings for any input, and configs often keep
            # Meta's 518 px pretraining crop: the card's input size is the one to feed.
            native = spec.input_size
        input_size = vit_input_size(name, phikon_mode, native, patch, patch_size)
        return _HF_FAMILIES[family][3](name, model, input_size, mean, std, source,
                                       pooling=pooling)
    return build


# --------------------------------------------------------------------------- configurations
# Phikon is a ViT-B/16 (iBOT) at 224 px; these are also transformers' ViTConfig defaults.
PHIKON_CONFIG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, image_size=224, patch_size=16)
TINY_VIT_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, image_size=224, patch_size=16)
# Phikon-v2 (Filiot et al., 2024): DINOv2 ViT-L/16 at 224 px, as its config.json declares
# (Dinov2Model, no register tokens, no SwiGLU, layerscale 1.0).
PHIKON_V2_CONFIG = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        mlp_ratio=4, image_size=224, patch_size=16, layerscale_value=1.0,
                        layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False)
# Midnight: DINOv2's ViT-g/14 (facebook/dinov2-giant's config: width 1536, 40 layers, 24
# heads, SwiGLU FFN) at the card's 224 px. Used for random builds and bare weight files; a
# downloaded folder's config.json takes precedence.
MIDNIGHT_CONFIG = dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                       mlp_ratio=4, image_size=224, patch_size=14, layerscale_value=1.0,
                       layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=True)

for _name, _config, _family, _note in (
        ("phikon", PHIKON_CONFIG, "vit", "Owkin, histology ViT-B/16"),
        ("phikon_v2", PHIKON_V2_CONFIG, "dinov2", "Owkin, histology ViT-L/16"),
        ("midnight", MIDNIGHT_CONFIG, "dinov2", "kaiko-ai/midnight, histology ViT-g/14")):
    _spec = FOUNDATION_MODELS[_name]
    register_backbone(_name, _spec.input_size, _spec.gated, note=_note)(
        _vit_builder(_name, _spec, _config, family=_family))
register_backbone("tiny_vit", 224, note="small ViT for tests, no pretrained weights")(
    _vit_builder("tiny_vit", None, TINY_VIT_CONFIG))
