"""The backbone registry: names, what each declares (input size, gated weights), and the factory."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from kit.utils import KitError

_REGISTRY: dict[str, Callable] = {}

# ImageNet CNNs were trained on 224 px crops: a backbone that declares no input size of its own
# is taken to have been pretrained at this size (``patches.size: auto`` cuts windows this size).
CNN_NATIVE_SIZE = 224
# The options every builder takes; create_backbone fills in the defaults.
OPTIONS = ("patch_size", "phikon_mode", "vit_config")


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


def native_size(name: str) -> int:
    """The window side a backbone was pretrained at: its declared input size, else 224."""
    if name not in _INFO:
        raise KitError(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())}")
    return int(_INFO[name].input_size or CNN_NATIVE_SIZE)


def vit_backbones() -> list[str]:
    """The registered transformers: the backbones that declare an input size."""
    return [name for name in list_backbones() if _INFO[name].input_size]


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


def create_backbone(name: str, weights: str | os.PathLike = "auto", **kwargs):
    """Build a registered backbone.

    Parameters
    ----------
    name : str
        One of :func:`list_backbones`.
    weights : {"auto", "random"} or path
        See :mod:`kit.models.weights`.
    patch_size : int, optional
        Side of the patches the caller feeds; CNNs and the ViTs in ``interpolate`` mode take
        patches at this size. Callers pass the size of their patch cache. Default (None):
        :func:`native_size`, the size the backbone was pretrained at (224 for every
        backbone registered today); no configuration file is read.
    phikon_mode : {"resize", "interpolate"}
        ViT backbones (:func:`vit_backbones`): resize patches to the native 224 px, or feed
        them at ``patch_size`` with interpolated position embeddings (``patch_size`` must be
        a multiple of the ViT's patch size: 16, or 14 for most DINOv2-style models).
    vit_config : dict, optional
        ViT backbones: architecture overrides (tests build tiny versions this way). For the
        transformers models (phikon, phikon_v2, midnight, tiny_vit), ``ViTConfig`` /
        ``Dinov2Config`` fields, applied on top of a loaded ``config.json`` too; for the timm
        models (uni, uni2_h, h_optimus_0, h_optimus_1, virchow2, gigapath), timm
        ``VisionTransformer`` arguments (``embed_dim``, ``depth``, ``num_heads``, ...).

    Returns
    -------
    kit.models.backbones.Backbone
    """
    if name not in _REGISTRY:
        raise KitError(f"unknown backbone {name!r}; known backbones: {', '.join(list_backbones())}")
    if weights is None or str(weights).strip() == "":
        raise KitError(f"{name}: weights must be 'auto', 'random' or a path")
    unknown = sorted(set(kwargs) - set(OPTIONS))
    if unknown:
        raise KitError(f"create_backbone({name!r}): unknown option(s) {', '.join(unknown)}; "
                       f"known: {', '.join(sorted(OPTIONS))}")
    if kwargs.get("patch_size") is None:
        kwargs["patch_size"] = native_size(name)
    size = kwargs["patch_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise KitError(f"{name}: patch_size must be an integer >= 8 (got {size!r})")
    kwargs.setdefault("phikon_mode", "resize")
    kwargs.setdefault("vit_config", None)
    return _REGISTRY[name](weights, **kwargs)


def no_vit_config(name: str, vit_config) -> None:
    """Refuse ``vit_config`` for a backbone that is not a ViT."""
    if vit_config:
        raise KitError(f"{name}: vit_config only applies to the ViT backbones "
                       f"({', '.join(vit_backbones())})")
