"""Backbones: a registry of feature extractors mapping normalised patches to one vector each.

``create_backbone(name, weights=...)`` builds a :class:`Backbone` (timm-style registry and
factory). Every builder follows the same order: resolve the weights, build the network,
load the weights, wrap it with its normalisation and input size. One module per job:

- :mod:`~kit.models.backbones.registry`: ``register_backbone``, ``list_backbones``,
  ``describe_backbones``, ``backbone_info``, ``native_size``, ``create_backbone``;
- :mod:`~kit.models.backbones.base`: the ``Backbone`` class, shared helpers, ``tiny_cnn``;
- :mod:`~kit.models.backbones.timm_cnn`: ImageNet CNNs (``efficientnet_b0``,
  ``convnext_tiny``, ``resnet18``, ``resnet50``);
- :mod:`~kit.models.backbones.foundation`: the table of pathology foundation models
  (:data:`FOUNDATION_MODELS`: repository, architecture, normalisation, embedding, from each
  model card) and the timm ones: ``uni``, ``uni2_h``, ``h_optimus_0``, ``h_optimus_1``,
  ``virchow2``, ``gigapath``;
- :mod:`~kit.models.backbones.hf_vit`: transformers ViTs: ``phikon``, ``phikon_v2``,
  ``midnight``, ``tiny_vit``;
- :mod:`~kit.models.backbones.freeze`: ``freeze_backbone``, ``count_trainable``,
  ``recalibrate_batchnorm`` (AdaBN).

Weights (``weights=``): ``"auto"`` (pretrained, looked up by :mod:`kit.models.weights`; the tiny
test backbones have none, so for them ``auto`` means random), a file or folder path, or
``"random"``. :mod:`kit.models.weights` describes the lookup and loads state dicts strictly.
"""
from __future__ import annotations

from kit.models.backbones.base import IMAGENET_MEAN, IMAGENET_STD, PHIKON_MODES, Backbone, TinyCNN
from kit.models.backbones.foundation import (
    FOUNDATION_MODELS,
    PHIKON_REPO,
    PHIKON_V2_REPO,
    TIMM_FOUNDATION_MODELS,
    FoundationModel,
    TimmViTBackbone,
)
from kit.models.backbones.freeze import (
    NORM_KINDS,
    count_trainable,
    freeze_backbone,
    recalibrate_batchnorm,
)
from kit.models.backbones.hf_vit import (
    MIDNIGHT_CONFIG,
    PHIKON_CONFIG,
    PHIKON_V2_CONFIG,
    TINY_VIT_CONFIG,
    Dinov2Backbone,
    ViTBackbone,
)
from kit.models.backbones.registry import (
    CNN_NATIVE_SIZE,
    BackboneInfo,
    backbone_info,
    create_backbone,
    describe_backbones,
    list_backbones,
    native_size,
    register_backbone,
    vit_backbones,
)
from kit.models.backbones.timm_cnn import (
    TIMM_CNNS,
    ConvNeXtBackbone,
    EfficientNetBackbone,
    ResNetBackbone,
    TimmBackbone,
)

__all__ = [
    "CNN_NATIVE_SIZE", "BackboneInfo", "backbone_info", "create_backbone", "describe_backbones",
    "list_backbones", "native_size", "register_backbone", "vit_backbones",
    "IMAGENET_MEAN", "IMAGENET_STD", "PHIKON_MODES", "Backbone", "TinyCNN",
    "TIMM_CNNS", "ConvNeXtBackbone", "EfficientNetBackbone", "ResNetBackbone", "TimmBackbone",
    "FOUNDATION_MODELS", "PHIKON_REPO", "PHIKON_V2_REPO", "TIMM_FOUNDATION_MODELS",
    "FoundationModel", "TimmViTBackbone",
    "MIDNIGHT_CONFIG", "PHIKON_CONFIG", "PHIKON_V2_CONFIG", "TINY_VIT_CONFIG", "Dinov2Backbone",
    "ViTBackbone",
    "NORM_KINDS", "count_trainable", "freeze_backbone", "recalibrate_batchnorm",
]
