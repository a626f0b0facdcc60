"""ImageNet CNNs from timm: efficientnet_b0, convnext_tiny, resnet18 and resnet50.

Each is built with ``num_classes=0`` (``forward`` returns the pooled features) and run at the
patch size; its ImageNet weights come through :func:`kit.models.weights.find_pretrained`
(``$KIT_WEIGHTS_DIR``, the Hugging Face cache of timm's repository, torch's hub cache under
the file name of timm's download URL, then a download).
"""
from __future__ import annotations

import torch
from torch import nn

from kit.models.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, group
from kit.models.backbones.registry import no_vit_config, register_backbone
from kit.models.weights import find_pretrained, load_module_weights, weights_path


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
        units[-1] = group(units[-1], m.conv_head, m.bn2)
        return units


class ConvNeXtBackbone(TimmBackbone):
    def blocks(self) -> list[nn.Module]:
        m = self.model
        units = []
        for stage in m.stages:
            blocks = list(stage.blocks)
            # A stage's downsampling layer runs right before its first block: open them together.
            if any(True for _ in stage.downsample.parameters()):
                blocks[0] = group(stage.downsample, blocks[0])
            units.extend(blocks)
        units[-1] = group(units[-1], m.norm_pre, m.head)
        return units


class ResNetBackbone(TimmBackbone):
    """A timm ``ResNet``; its blocks are the stem (conv1, bn1) and the four stages.

    Whole stages, not single residual blocks: fine-tuning recipes for ResNets thaw them
    stage by stage (``unfreeze_last: 2`` opens layer3 and layer4).
    """

    def blocks(self) -> list[nn.Module]:
        m = self.model
        return [group(m.conv1, m.bn1), m.layer1, m.layer2, m.layer3, m.layer4]


def _timm_builder(name: str, arch: str, cls: type[TimmBackbone]):
    def build(weights, patch_size, phikon_mode, vit_config) -> Backbone:
        import timm

        no_vit_config(name, vit_config)
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


# timm architecture (with its pretrained tag) and wrapper of each CNN. The ResNets take
# torchvision's original ImageNet weights (tv_in1k, BSD-3): the "ImageNet ResNet" competitors
# fine-tuned, and a file torchvision may already have put in torch's hub cache.
TIMM_CNNS = {
    "efficientnet_b0": ("efficientnet_b0", EfficientNetBackbone),
    "convnext_tiny": ("convnext_tiny", ConvNeXtBackbone),
    "resnet18": ("resnet18.tv_in1k", ResNetBackbone),
    "resnet50": ("resnet50.tv_in1k", ResNetBackbone),
}

for _name, (_arch, _cls) in TIMM_CNNS.items():
    register_backbone(_name, note="timm, ImageNet")(_timm_builder(_name, _arch, _cls))
