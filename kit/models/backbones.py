"""Backbones: a registry of feature extractors mapping normalised patches to one vector each.

``create_backbone(name, weights=...)`` builds a :class:`Backbone` (timm-style registry and
factory). Every builder follows the same order: resolve the weights, build the network,
load the weights, wrap it with its normalisation and input size.

Pathology foundation models (all at 224 px; the table :data:`FOUNDATION_MODELS` records
each one's repository, architecture, normalisation and embedding):

- ``phikon`` (``owkin/phikon``, iBOT ViT-B/16, CLS token, 768-d) and ``phikon_v2``
  (``owkin/phikon-v2``, DINOv2 ViT-L/16, CLS token, 1024-d), through transformers;
- ``uni`` (``MahmoodLab/uni``, ViT-L/16, CLS token, 1024-d), ``h_optimus_0``
  (``bioptimus/H-optimus-0``, ViT-g/14 with 4 register tokens, CLS token, 1536-d) and
  ``virchow2`` (``paige-ai/Virchow2``, ViT-H/14 with a SwiGLU MLP and 4 register tokens, CLS
  token concatenated with the mean of the patch tokens, 2560-d), through timm with the
  architecture arguments of their model cards.

Weights (``weights=``): ``"auto"`` (pretrained, looked up by :mod:`kit.models.weights`; the tiny
test backbones have none, so for them ``auto`` means random), a file or folder path, or
``"random"``. :mod:`kit.models.weights` describes the lookup and loads state dicts strictly.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from kit.utils import KitError
from kit.models.weights import (find_pretrained, first_line, load_module_weights, weight_file,
                                weights_path)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PHIKON_REPO = "owkin/phikon"
PHIKON_MODES = ("resize", "interpolate")
# Phikon is a ViT-B/16 (iBOT) at 224 px; these are also transformers' ViTConfig defaults.
PHIKON_CONFIG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, image_size=224, patch_size=16)
TINY_VIT_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, image_size=224, patch_size=16)
PHIKON_V2_REPO = "owkin/phikon-v2"
# Phikon-v2 (Filiot et al., 2024): DINOv2 ViT-L/16 at 224 px, as its config.json declares
# (Dinov2Model, no register tokens, no SwiGLU, layerscale 1.0).
PHIKON_V2_CONFIG = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        mlp_ratio=4, image_size=224, patch_size=16, layerscale_value=1.0,
                        layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False)
NORM_KINDS = {
    # _BatchNorm covers BatchNorm1d/2d/3d and timm's BatchNormAct2d; nn.LayerNorm covers
    # timm's LayerNorm2d; nn.GroupNorm covers timm's GroupNorm/GroupNorm1.
    "batchnorm": nn.modules.batchnorm._BatchNorm,
    "groupnorm": nn.GroupNorm,
    "layernorm": nn.LayerNorm,
}

_REGISTRY: dict[str, Callable[..., "Backbone"]] = {}


# --------------------------------------------------------------------------- base class
class Backbone(nn.Module):
    """A feature extractor: ``forward(x)`` maps ``B x 3 x S x S`` normalised floats to ``B x F``.

    Attributes
    ----------
    name : str
        Registry name.
    num_features : int
        Feature size ``F``.
    mean, std : tuple of 3 floats
        Normalisation the weights expect (pixel values scaled to [0, 1] first).
    input_size : int
        Side ``S`` the caller resizes patches to (if the patch size differs).
    weights_source : str
        Where the weights came from: ``random``, ``local:PATH``, ``hf-cache:REPO``,
        ``timm-cache:PATH`` or ``hub:REPO`` (downloaded now).
    """

    def __init__(self, name: str, num_features: int, input_size: int,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, weights_source: str = "random"):
        super().__init__()
        self.name = name
        self.num_features = int(num_features)
        self.input_size = int(input_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.weights_source = weights_source

    def blocks(self) -> list[nn.Module]:
        """The main blocks in forward order; modules after the last block belong to it."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, num_features={self.num_features}, "
                f"input_size={self.input_size}, weights_source={self.weights_source!r}")


def _group(*modules: nn.Module) -> nn.Module:
    """One block made of several modules (not registered anywhere: no duplicate state keys)."""
    return modules[0] if len(modules) == 1 else nn.ModuleList(modules)


class TimmBackbone(Backbone):
    """A timm model built with ``num_classes=0``, so ``forward`` returns pooled features."""

    def __init__(self, name: str, model: nn.Module, input_size: int, weights_source: str):
        cfg = model.pretrained_cfg
        super().__init__(name, model.num_features, input_size, cfg.get("mean", IMAGENET_MEAN),
                         cfg.get("std", IMAGENET_STD), weights_source)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class EfficientNetBackbone(TimmBackbone):
    def blocks(self) -> list[nn.Module]:
        m = self.model
        units = [block for stage in m.blocks for block in stage]
        units[-1] = _group(units[-1], m.conv_head, m.bn2)
        return units


class ConvNeXtBackbone(TimmBackbone):
    def blocks(self) -> list[nn.Module]:
        m = self.model
        units = []
        for stage in m.stages:
            blocks = list(stage.blocks)
            # A stage's downsampling layer runs right before its first block: open them together.
            if any(True for _ in stage.downsample.parameters()):
                blocks[0] = _group(stage.downsample, blocks[0])
            units.extend(blocks)
        units[-1] = _group(units[-1], m.norm_pre, m.head)
        return units


class ViTBackbone(Backbone):
    """A transformers ``ViTModel``; the feature is the CLS token of the last hidden state."""

    def __init__(self, name: str, model: nn.Module, input_size: int, mean, std,
                 weights_source: str):
        super().__init__(name, model.config.hidden_size, input_size, mean, std, weights_source)
        self.model = model
        self._native = _side(model.config.image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Position embeddings are for the native size; other sizes need interpolating them.
        interpolate = x.shape[-1] != self._native or x.shape[-2] != self._native
        out = self.model(pixel_values=x, interpolate_pos_encoding=interpolate)
        return out.last_hidden_state[:, 0]

    def blocks(self) -> list[nn.Module]:
        layers = _vit_layers(self.model)
        layers[-1] = _group(layers[-1], self.model.layernorm)
        return layers


class Dinov2Backbone(ViTBackbone):
    """A transformers ``Dinov2Model`` (phikon_v2); the feature is the CLS token.

    DINOv2 interpolates its position embeddings for any input size by itself, so the
    forward takes no ``interpolate_pos_encoding`` flag.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state[:, 0]


class TimmViTBackbone(Backbone):
    """A timm ``VisionTransformer`` (uni, h_optimus_0, virchow2).

    ``pooling="cls"``: the CLS token after the final norm (what timm returns for
    ``global_pool="token"``). ``pooling="cls+mean"``: the model is built with
    ``global_pool=""`` (it returns every token) and the feature is the CLS token
    concatenated with the mean of the patch tokens, register tokens excluded (Virchow2's
    embedding); ``num_features`` is then twice the width.
    """

    POOLINGS = ("cls", "cls+mean")

    def __init__(self, name: str, model: nn.Module, input_size: int, mean, std,
                 weights_source: str, pooling: str = "cls"):
        if pooling not in self.POOLINGS:
            raise ValueError(f"pooling must be one of {self.POOLINGS} (got {pooling!r})")
        if (pooling == "cls+mean") != (model.global_pool == ""):
            raise ValueError("pooling 'cls+mean' needs a model built with global_pool='' "
                             "(and 'cls' one with a pooled output)")
        width = model.embed_dim
        super().__init__(name, width * (2 if pooling == "cls+mean" else 1), input_size, mean,
                         std, weights_source)
        self.model = model
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)  # the official forward: B x F pooled, or B x tokens x F
        if self.pooling == "cls":
            return out
        patches = out[:, self.model.num_prefix_tokens:]  # skip CLS and register tokens
        return torch.cat([out[:, 0], patches.mean(dim=1)], dim=1)

    def blocks(self) -> list[nn.Module]:
        m = self.model
        units = list(m.blocks)
        units[-1] = _group(units[-1], m.norm, m.fc_norm)
        return units


def _vit_layers(model: nn.Module) -> list[nn.Module]:
    # transformers >= 5 names them model.layers; 4.x had model.encoder.layer.
    layers = getattr(model, "layers", None)
    if layers is None:
        layers = model.encoder.layer
    return list(layers)


class TinyCNN(Backbone):
    """Four conv + BatchNorm + ReLU blocks and global average pooling; fast on a CPU."""

    def __init__(self, input_size: int, widths=(16, 32, 64, 64)):
        super().__init__("tiny_cnn", widths[-1], input_size,
                         weights_source="random (tiny_cnn has no pretrained weights)")
        layers, c_in = [], 3
        for c_out in widths:
            layers.append(nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                                        nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)

    def blocks(self) -> list[nn.Module]:
        return list(self.features)


def _side(size) -> int:
    return int(size[0] if isinstance(size, (tuple, list)) else size)


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class BackboneInfo:
    """What the registry says of a backbone, for ``--help`` and the README."""

    name: str
    input_size: int | None  # the side it was trained at; None: a CNN, run at the patch size
    gated: bool = False  # its weights need a licence accepted on the Hub first
    note: str = ""


_INFO: dict[str, BackboneInfo] = {}


def register_backbone(name: str, input_size: int | None = None, gated: bool = False,
                      note: str = ""):
    """Decorator: register ``builder(weights, **kwargs) -> Backbone`` under ``name``, with
    its native input size, whether its weights are gated, and a short note."""
    def decorate(builder):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = builder
        _INFO[name] = BackboneInfo(name, input_size, gated, note)
        return builder
    return decorate


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def backbone_info(name: str) -> BackboneInfo:
    return _INFO[name]


# ImageNet CNNs were trained on 224 px crops; ``patches.size: auto`` cuts windows this size for
# a backbone that declares no input size of its own.
CNN_NATIVE_SIZE = 224


def native_size(name: str) -> int:
    """The window side a backbone was pretrained at: its declared input size, else 224."""
    if name not in _INFO:
        raise KitError(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())}")
    return int(_INFO[name].input_size or CNN_NATIVE_SIZE)


def describe_backbones(notes: bool = True) -> list[str]:
    """One line per registered backbone: name, input size, gated weights (and a note)."""
    lines = []
    for name in list_backbones():
        info = _INFO[name]
        size = f"{info.input_size} px" if info.input_size else "CNN, at the patch size"
        gated = ", gated weights" if info.gated else ""
        note = f": {info.note}" if notes and info.note else ""
        lines.append(f"{name} ({size}{gated}){note}")
    return lines


def create_backbone(name: str, weights: str | os.PathLike = "auto", **kwargs) -> Backbone:
    """Build a registered backbone.

    Parameters
    ----------
    name : str
        One of :func:`list_backbones`.
    weights : {"auto", "random"} or path
        See :mod:`kit.models.weights`.
    patch_size : int, optional
        Side of the cached patches (default: ``kit/conf/patches.yaml``); CNNs and the ViTs
        in ``interpolate`` mode take patches at this size.
    phikon_mode : {"resize", "interpolate"}
        ViT backbones (:data:`VIT_BACKBONES`): resize patches to the native 224 px, or feed
        them at ``patch_size`` with interpolated position embeddings (``patch_size`` must be
        a multiple of the ViT's patch size: 16, or 14 for h_optimus_0 and virchow2).
    vit_config : dict, optional
        ViT backbones: architecture overrides (tests build tiny versions this way). For
        phikon, phikon_v2 and tiny_vit, ``ViTConfig`` / ``Dinov2Config`` fields, applied on
        top of a loaded ``config.json`` too; for uni, h_optimus_0 and virchow2, timm
        ``VisionTransformer`` arguments (``embed_dim``, ``depth``, ``num_heads``, ...).
    """
    if name not in _REGISTRY:
        raise KitError(f"unknown backbone {name!r}; known backbones: {', '.join(list_backbones())}")
    if weights is None or str(weights).strip() == "":
        raise KitError(f"{name}: weights must be 'auto', 'random' or a path")
    known = {"patch_size", "phikon_mode", "vit_config"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise KitError(f"create_backbone({name!r}): unknown option(s) {', '.join(unknown)}; "
                       f"known: {', '.join(sorted(known))}")
    if kwargs.get("patch_size") is None:
        from kit.config import load_config
        kwargs["patch_size"] = int(load_config("patches")["size"])
    size = kwargs["patch_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise KitError(f"{name}: patch_size must be an integer >= 8 (got {size!r})")
    kwargs.setdefault("phikon_mode", "resize")
    kwargs.setdefault("vit_config", None)
    return _REGISTRY[name](weights, **kwargs)


VIT_BACKBONES = ("phikon", "phikon_v2", "uni", "h_optimus_0", "virchow2", "tiny_vit")


def _no_vit_config(name: str, vit_config) -> None:
    if vit_config:
        raise KitError(f"{name}: vit_config only applies to the ViT backbones "
                       f"({', '.join(VIT_BACKBONES)})")


# --------------------------------------------------------------------------- timm models
def _timm_builder(name: str, arch: str, cls: type[TimmBackbone]):
    def build(weights, patch_size, phikon_mode, vit_config) -> Backbone:
        import timm

        _no_vit_config(name, vit_config)
        path = weights_path(name, weights)
        source = "random"
        if path is None and str(weights) == "auto":
            cfg = timm.models.get_pretrained_cfg(arch)
            path, source = find_pretrained(name, cfg.hf_hub_id, need_config=False, url=cfg.url)
        elif path is not None:
            source = f"local:{path}"
        model = timm.create_model(arch, pretrained=False, num_classes=0)
        if path is not None:
            ignore = model.pretrained_cfg.get("classifier") or ()
            ignore = (ignore,) if isinstance(ignore, str) else tuple(ignore)
            load_module_weights(model, path, name, ignore=ignore)
        return cls(name, model, patch_size, source)
    return build


register_backbone("efficientnet_b0", note="timm, ImageNet")(_timm_builder("efficientnet_b0", "efficientnet_b0",
                                                   EfficientNetBackbone))
register_backbone("convnext_tiny", note="timm, ImageNet")(_timm_builder("convnext_tiny", "convnext_tiny",
                                                 ConvNeXtBackbone))


@register_backbone("tiny_cnn", note="small CNN for tests and benchmarks, no pretrained weights")
def _build_tiny_cnn(weights, patch_size, phikon_mode, vit_config) -> Backbone:
    _no_vit_config("tiny_cnn", vit_config)
    path = weights_path("tiny_cnn", weights)
    model = TinyCNN(patch_size)
    if path is not None:
        load_module_weights(model, path, "tiny_cnn")
        model.weights_source = f"local:{path}"
    elif str(weights) == "random":
        model.weights_source = "random"
    return model


# --------------------------------------------------------------------------- ViT models
# transformers model families: config class, model class, extra model arguments, backbone.
_HF_FAMILIES = {
    "vit": ("ViTConfig", "ViTModel", {"add_pooling_layer": False}, ViTBackbone),
    "dinov2": ("Dinov2Config", "Dinov2Model", {}, Dinov2Backbone),
}
# State-dict keys a checkpoint may lack without harm: DINOv2's mask token is only used for
# masked-image pre-training, never in a forward pass on plain images.
_OPTIONAL_KEYS = ("embeddings.mask_token",)


def _check_mode(name: str, phikon_mode) -> None:
    if phikon_mode not in PHIKON_MODES:
        raise KitError(f"{name}: phikon_mode {phikon_mode!r} unknown; use one of "
                       f"{', '.join(PHIKON_MODES)}")


def _vit_input_size(name: str, phikon_mode: str, native: int, patch: int, patch_size: int) -> int:
    """The side patches are fed at: the native size, or the patch size with interpolation."""
    if phikon_mode == "resize":
        return native
    if patch_size % patch:
        raise KitError(f"{name}: phikon_mode 'interpolate' needs a patch size divisible by "
                       f"the ViT patch size {patch} (got {patch_size}); use 'resize' "
                       "or change patches.size")
    return patch_size


def _vit_builder(name: str, repo: str | None, base_config: dict, family: str = "vit"):
    def build(weights, patch_size, phikon_mode, vit_config) -> Backbone:
        _check_mode(name, phikon_mode)
        path = weights_path(name, weights)
        if path is not None:
            source = f"local:{path}"
        elif str(weights) == "auto" and repo is not None:
            path, source = find_pretrained(name, repo, need_config=True)
        elif str(weights) == "auto":
            source = f"random ({name} has no pretrained weights)"
        else:
            source = "random"
        model, mean, std = _load_vit(name, path, base_config, vit_config or {}, family)
        native, patch = _side(model.config.image_size), _side(model.config.patch_size)
        input_size = _vit_input_size(name, phikon_mode, native, patch, patch_size)
        return _HF_FAMILIES[family][3](name, model, input_size, mean, std, source)
    return build


register_backbone("phikon", 224, note="Owkin, histology ViT-B/16")(_vit_builder("phikon", PHIKON_REPO, PHIKON_CONFIG))
register_backbone("phikon_v2", 224, note="Owkin, histology ViT-L/16")(_vit_builder("phikon_v2", PHIKON_V2_REPO, PHIKON_V2_CONFIG,
                                            family="dinov2"))
register_backbone("tiny_vit", 224, note="small ViT for tests, no pretrained weights")(_vit_builder("tiny_vit", None, TINY_VIT_CONFIG))


def _hf_classes(family: str):
    import transformers

    config_cls, model_cls, model_kwargs, _ = _HF_FAMILIES[family]
    return getattr(transformers, config_cls), getattr(transformers, model_cls), model_kwargs


def _load_vit(name: str, path: Path | None, base: dict, overrides: dict, family: str = "vit"):
    """``(model, mean, std)``: random from ``base + overrides``, or loaded from ``path``.

    ``family`` is ``vit`` (``ViTModel``) or ``dinov2`` (``Dinov2Model``). Files and
    weights-only folders are linked into a temporary ``save_pretrained`` layout so that
    every load goes through ``from_pretrained`` (which also converts old key names).
    """
    config_cls, model_cls, model_kwargs = _hf_classes(family)
    if path is None:
        return model_cls(_vit_config(name, config_cls(**base), overrides),
                         **model_kwargs), IMAGENET_MEAN, IMAGENET_STD
    folder = path if path.is_dir() else path.parent
    mean, std = _preprocessor_norm(folder)
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
                               "another shape: another architecture, or a wrong vit_config?)")
            raise KitError(f"{name}: cannot load weights from {path}: {first_line(exc)}")
    bad = sorted(k for k in info.get("missing_keys") or [] if not k.endswith(_OPTIONAL_KEYS))
    bad += sorted(info.get("mismatched_keys") or [])
    if bad:
        raise KitError(f"{name}: weights in {path} do not fit the model ({len(bad)} tensors "
                       f"missing or of another shape, e.g. {bad[0]}); refusing to train with "
                       "randomly initialised layers")
    return model, mean, std


# --------------------------------------------------------------------------- timm ViT models
@dataclass(frozen=True)
class FoundationModel:
    """One pathology foundation model: where its weights live and how to use them.

    Attributes
    ----------
    repo : str
        Hugging Face repository (``hf-hub:<repo>`` for timm).
    arch : str
        Architecture: a timm model name, or ``transformers:<Model class>``.
    input_size : int
        Side the model was trained at (patches are resized to it in ``resize`` mode).
    mean, std : tuple of 3 floats
        Input normalisation, from the model card.
    embedding : str
        What the feature vector is (for the README and reports).
    gated : bool
        The repository asks each user to accept its licence before downloading.
    timm_kwargs : dict
        Architecture arguments from the model card (timm models only; the SwiGLU MLP and
        its activation are added by :func:`_timm_layers` when ``swiglu``).
    swiglu : bool
        ``mlp_layer=SwiGLUPacked, act_layer=SiLU`` (Virchow2's card passes them explicitly).
    pooling : {"cls", "cls+mean"}
        See :class:`TimmViTBackbone`.
    """

    repo: str
    arch: str
    input_size: int
    mean: tuple
    std: tuple
    embedding: str
    gated: bool = False
    timm_kwargs: dict = field(default_factory=dict)
    swiglu: bool = False
    pooling: str = "cls"


FOUNDATION_MODELS = {
    "phikon": FoundationModel(
        PHIKON_REPO, "transformers:ViTModel", 224, IMAGENET_MEAN, IMAGENET_STD,
        "CLS token, 768-d"),
    "phikon_v2": FoundationModel(
        PHIKON_V2_REPO, "transformers:Dinov2Model", 224, IMAGENET_MEAN, IMAGENET_STD,
        "CLS token, 1024-d"),
    # UNI (Chen et al., 2024): ViT-L/16 with LayerScale; the card passes init_values so that
    # the ls*.gamma tensors exist, and dynamic_img_size.
    "uni": FoundationModel(
        "MahmoodLab/uni", "vit_large_patch16_224", 224, IMAGENET_MEAN, IMAGENET_STD,
        "CLS token, 1024-d", gated=True,
        timm_kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                         dynamic_img_size=True)),
    # H-optimus-0 (Bioptimus, 2024): ViT-g/14, 4 register tokens, SwiGLU (timm's DINOv2 giant
    # with registers), its own normalisation; card: init_values=1e-5, dynamic_img_size=False.
    "h_optimus_0": FoundationModel(
        "bioptimus/H-optimus-0", "vit_giant_patch14_reg4_dinov2", 224,
        (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517),
        "CLS token, 1536-d", gated=True,
        timm_kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, global_pool="token",
                         dynamic_img_size=False)),
    # Virchow2 (Zimmermann et al., 2024): ViT-H/14, SwiGLUPacked MLP with SiLU, 4 register
    # tokens; the embedding is the CLS token concatenated with the mean patch token.
    "virchow2": FoundationModel(
        "paige-ai/Virchow2", "vit_huge_patch14_224", 224, IMAGENET_MEAN, IMAGENET_STD,
        "CLS token + mean of the patch tokens, 2560-d", gated=True, swiglu=True,
        pooling="cls+mean",
        timm_kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4,
                         mlp_ratio=5.3375, global_pool="", dynamic_img_size=True)),
}


def _timm_layers(spec: FoundationModel) -> dict:
    if not spec.swiglu:
        return {}
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


def _timm_vit_overrides(name: str, vit_config) -> dict:
    """``vit_config`` for a timm ViT: ``VisionTransformer`` arguments (tests shrink the model)."""
    from timm.models.vision_transformer import VisionTransformer

    overrides = dict(vit_config or {})
    known = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise KitError(f"{name}: vit_config key(s) {', '.join(map(repr, unknown))} are not "
                       "timm VisionTransformer arguments (e.g. embed_dim, depth, num_heads)")
    return overrides


def _timm_vit_builder(name: str):
    spec = FOUNDATION_MODELS[name]

    def build(weights, patch_size, phikon_mode, vit_config) -> Backbone:
        _check_mode(name, phikon_mode)
        path = weights_path(name, weights)
        source = "random"
        if path is not None:
            source = f"local:{path}"
        elif str(weights) == "auto":
            path, source = find_pretrained(name, spec.repo, need_config=False, gated=spec.gated)
        import timm  # after the lookup: a missing-weights error comes without timm's import

        kwargs = {**spec.timm_kwargs, **_timm_layers(spec)}
        if phikon_mode == "interpolate":
            kwargs["dynamic_img_size"] = True  # position embeddings resampled per input size
        kwargs.update(_timm_vit_overrides(name, vit_config))
        if path is not None:
            kwargs["weight_init"] = "skip"  # every tensor is overwritten (checked) below
        model = timm.create_model(spec.arch, pretrained=False, **kwargs)
        if path is not None:
            load_module_weights(model, path, name, ignore=("head",))
        native, patch = _side(model.patch_embed.img_size), _side(model.patch_embed.patch_size)
        input_size = _vit_input_size(name, phikon_mode, native, patch, patch_size)
        return TimmViTBackbone(name, model, input_size, spec.mean, spec.std, source,
                               pooling=spec.pooling)
    return build


for _name in ("uni", "h_optimus_0", "virchow2"):
    _spec = FOUNDATION_MODELS[_name]
    register_backbone(_name, _spec.input_size, _spec.gated, note=_spec.repo)(
        _timm_vit_builder(_name))


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


def _preprocessor_norm(folder: Path):
    """mean/std from a ``preprocessor_config.json`` beside the weights (ImageNet otherwise)."""
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        try:
            cfg = json.loads(pre.read_text())
            if len(cfg["image_mean"]) == 3 and len(cfg["image_std"]) == 3:
                return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
        except (ValueError, KeyError, TypeError):
            raise KitError(f"{pre}: no 3-channel image_mean/image_std; fix or delete the file")
    return IMAGENET_MEAN, IMAGENET_STD


# --------------------------------------------------------------------------- freezing
def _norm_types(train_norm) -> tuple[type, ...]:
    if train_norm is None:
        return ()
    kinds = train_norm.split(",") if isinstance(train_norm, str) else list(train_norm)
    kinds = [str(k).strip().lower() for k in kinds]
    kinds = [k for k in kinds if k and k != "none"]
    unknown = [k for k in kinds if k not in NORM_KINDS]
    if unknown:
        raise KitError(f"train_norm: unknown kind(s) {', '.join(unknown)}; "
                       f"use any of {', '.join(NORM_KINDS)} or none")
    return tuple(NORM_KINDS[k] for k in kinds)


def freeze_backbone(backbone: Backbone, train_norm=("batchnorm", "groupnorm", "layernorm"),
                    unfreeze_last: int = 0) -> int:
    """Freeze ``backbone`` except its normalisation layers and its last ``unfreeze_last`` blocks.

    Parameters
    ----------
    train_norm : sequence of {"batchnorm", "groupnorm", "layernorm"} or comma-separated str
        Kinds of normalisation layers that stay trainable (empty or "none": none).
    unfreeze_last : int
        Number of blocks (``backbone.blocks()``, from the end) left fully trainable.

    Returns
    -------
    int
        Number of trainable parameters of the backbone.
    """
    norms = _norm_types(train_norm)
    blocks = backbone.blocks()
    if not isinstance(unfreeze_last, int) or isinstance(unfreeze_last, bool) \
            or not 0 <= unfreeze_last <= len(blocks):
        raise KitError(f"unfreeze_last must be an integer in 0..{len(blocks)} for "
                       f"{getattr(backbone, 'name', 'this backbone')} (got {unfreeze_last!r})")
    backbone.requires_grad_(False)
    for module in backbone.modules():
        if norms and isinstance(module, norms):
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
    for block in blocks[len(blocks) - unfreeze_last:]:
        block.requires_grad_(True)
    return count_trainable(backbone)


def count_trainable(module: nn.Module) -> int:
    """Number of parameters with ``requires_grad``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- AdaBN
def recalibrate_batchnorm(backbone: Backbone, array, rows=None, batch_size: int = 64,
                          device="cpu", max_batches: int | None = None) -> int:
    """Re-estimate the BatchNorm statistics of a frozen backbone on the data (AdaBN).

    A randomly initialised network in eval mode normalises with running statistics of
    0 / 1 that have nothing to do with its activations: a random ``efficientnet_b0`` then
    gives embeddings of magnitude ~1e-5, which a head cannot learn from (and float16
    cannot store). Resetting the statistics and averaging them over real patches gives
    activations of order 1 (Li et al., 2016, "Revisiting batch normalization for practical
    domain adaptation"). Only the running mean/variance buffers change, never a weight.

    Parameters
    ----------
    backbone : Backbone
        Moved to ``device``; left there, in eval mode.
    array : uint8 array ``N x K x P x P x 3``
        Patches (a memmap is fine), normalised like :func:`kit.training.predict.predict` does
        (:func:`kit.training.augment.normalize_batch` with the backbone's mean, std and input size).
    rows : int array, optional
        Images to use (default: all), e.g. the fold's training rows.
    batch_size : int
        Patches per forward pass. Statistics are a cumulative average over batches
        (``momentum=None``); batches are of (nearly) equal size so every patch counts alike.
    max_batches : int, optional
        Use at most ``max_batches * batch_size`` patches, spread evenly over the images.

    Returns
    -------
    int
        Number of patches used (0 when the backbone has no BatchNorm layer: nothing to do).
        Deterministic: the same inputs give the same statistics.
    """
    from kit.models.normalize import normalize_batch

    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    backbone.eval()
    if not bns:
        return 0
    shape = getattr(array, "shape", ())
    if len(shape) != 5 or shape[-1] != 3 or np.dtype(array.dtype) != np.uint8:
        raise KitError(f"recalibrate_batchnorm: patches must be a uint8 N x K x P x P x 3 array "
                       f"(got shape {tuple(shape)}, dtype {getattr(array, 'dtype', None)})")
    for key, value in (("batch_size", batch_size), ("max_batches", max_batches)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise KitError(f"recalibrate_batchnorm: {key} must be an integer >= 1 "
                           f"(got {value!r})")
    rows = np.arange(shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    k = int(shape[1])
    n = len(rows) * k
    if n == 0:
        raise KitError("recalibrate_batchnorm: no patches to estimate statistics from")
    limit = n if max_batches is None else min(n, max_batches * batch_size)
    # Evenly spaced patch numbers: every image contributes, and the choice is fixed.
    flat = np.arange(n) if limit == n else np.unique(np.linspace(0, n - 1, limit).round()
                                                     .astype(np.int64))
    # array_split: equal sizes up to one, so no batch of 1 (which BatchNorm refuses on 1x1 maps)
    # and the cumulative average weighs every patch (almost) equally.
    batches = np.array_split(flat, -(-len(flat) // batch_size))
    device = torch.device(device)
    backbone.to(device)
    saved = [(m, m.momentum) for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over all batches
            m.train()
        with torch.no_grad():
            for idx in batches:
                # One sorted fancy index per batch: a memmap reads only those patches.
                img, patch = rows[idx // k], idx % k
                x = torch.from_numpy(np.ascontiguousarray(array[img, patch]))
                backbone(normalize_batch(x.to(device), backbone.mean, backbone.std,
                                         backbone.input_size))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        backbone.eval()
    return int(len(flat))
