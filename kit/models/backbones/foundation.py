"""Pathology foundation models: the table of their cards, and the timm ViTs built from it.

:data:`FOUNDATION_MODELS` records, for each model, its repository, architecture and loader,
input size, normalisation and embedding, as its model card gives them. The timm ones (uni,
uni2_h, h_optimus_0, h_optimus_1, virchow2, gigapath) are built here with the card's
``timm.create_model`` arguments; the transformers ones (phikon, phikon_v2, midnight) in
:mod:`kit.models.backbones.hf_vit`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

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
from kit.models.backbones.registry import register_backbone
from kit.models.weights import find_pretrained, load_module_weights, weights_path
from kit.utils import KitError

PHIKON_REPO = "owkin/phikon"
PHIKON_V2_REPO = "owkin/phikon-v2"
# Bioptimus' normalisation (H-optimus-0 and H-optimus-1 cards).
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


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
        ``mlp_layer=SwiGLUPacked, act_layer=SiLU`` passed explicitly (Virchow2's and UNI2-h's
        cards do; timm's DINOv2 giants have them by default).
    pooling : {"cls", "cls+mean"}
        The CLS token, or the CLS token concatenated with the mean of the patch tokens.
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


class TimmViTBackbone(Backbone):
    """A timm ``VisionTransformer`` (uni, uni2_h, h_optimus_0, h_optimus_1, virchow2, gigapath).

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
        units[-1] = group(units[-1], m.norm, m.fc_norm)
        return units


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
        check_mode(name, phikon_mode)
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
        native, patch = side(model.patch_embed.img_size), side(model.patch_embed.patch_size)
        input_size = vit_input_size(name, phikon_mode, native, patch, patch_size)
        return TimmViTBackbone(name, model, input_size, spec.mean, spec.std, source,
                               pooling=spec.pooling)
    return build


# --------------------------------------------------------------------------- the cards
FOUNDATION_MODELS = {
    "phikon": FoundationModel(
        PHIKON_REPO, "transformers:ViTModel", 224, IMAGENET_MEAN, IMAGENET_STD,
        "CLS token, 768-d"),
    "phikon_v2": FoundationModel(
        PHIKON_V2_REPO, "transformers:Dinov2Model", 224, IMAGENET_MEAN, IMAGENET_STD,
        "CLS token, 1024-d"),
    # Midnight-12k (Karasikov et al., 2025): DINOv2 ViT-g/14 (transformers Dinov2Model, no
    # register tokens), MIT licence, not gated; the card normalises with mean = std = 0.5 and
    # embeds a tile as the CLS token concatenated with the mean of the patch tokens.
    "midnight": FoundationModel(
        "kaiko-ai/midnight", "transformers:Dinov2Model", 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
        "CLS token + mean of the patch tokens, 3072-d", pooling="cls+mean"),
    # UNI (Chen et al., 2024): ViT-L/16 with LayerScale; the card passes init_values so that
    # the ls*.gamma tensors exist, and dynamic_img_size.
    "uni": FoundationModel(
        "MahmoodLab/uni", "vit_large_patch16_224", 224, IMAGENET_MEAN, IMAGENET_STD,
        "CLS token, 1024-d", gated=True,
        timm_kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                         dynamic_img_size=True)),
    # UNI2-h (MahmoodLab, 2025): ViT-H/14, 24 blocks of width 1536, SwiGLUPacked MLP with SiLU,
    # 8 register tokens, no position embedding on the prefix tokens; the card's timm_kwargs on
    # timm's vit_giant_patch14_224 (the hub config's architecture).
    "uni2_h": FoundationModel(
        "MahmoodLab/UNI2-h", "vit_giant_patch14_224", 224, IMAGENET_MEAN, IMAGENET_STD,
        "CLS token, 1536-d", gated=True, swiglu=True,
        timm_kwargs=dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
                         embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0,
                         no_embed_class=True, reg_tokens=8, dynamic_img_size=True)),
    # H-optimus-0 (Bioptimus, 2024): ViT-g/14, 4 register tokens, SwiGLU (timm's DINOv2 giant
    # with registers), its own normalisation; card: init_values=1e-5, dynamic_img_size=False.
    "h_optimus_0": FoundationModel(
        "bioptimus/H-optimus-0", "vit_giant_patch14_reg4_dinov2", 224, HOPTIMUS_MEAN,
        HOPTIMUS_STD, "CLS token, 1536-d", gated=True,
        timm_kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, global_pool="token",
                         dynamic_img_size=False)),
    # H-optimus-1 (Bioptimus, 2025): the same architecture, loader arguments and normalisation
    # as H-optimus-0 on its card, trained on more slides.
    "h_optimus_1": FoundationModel(
        "bioptimus/H-optimus-1", "vit_giant_patch14_reg4_dinov2", 224, HOPTIMUS_MEAN,
        HOPTIMUS_STD, "CLS token, 1536-d", gated=True,
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
    # Prov-GigaPath tile encoder (Xu et al., 2024): timm's vit_giant_patch14_dinov2 (SwiGLU)
    # with the hub config's model_args, which make it a /16 patch ViT-g at 224 px; ImageNet
    # normalisation (the card resizes to 256 and centre-crops 224).
    "gigapath": FoundationModel(
        "prov-gigapath/prov-gigapath", "vit_giant_patch14_dinov2", 224, IMAGENET_MEAN,
        IMAGENET_STD, "CLS token, 1536-d", gated=True,
        timm_kwargs=dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40,
                         num_heads=24, init_values=1e-5, mlp_ratio=5.33334, num_classes=0,
                         global_pool="token")),
}
TIMM_FOUNDATION_MODELS = tuple(n for n, s in FOUNDATION_MODELS.items()
                               if not s.arch.startswith("transformers:"))


for _name in TIMM_FOUNDATION_MODELS:
    _spec = FOUNDATION_MODELS[_name]
    register_backbone(_name, _spec.input_size, _spec.gated, note=_spec.repo)(
        _timm_vit_builder(_name))
