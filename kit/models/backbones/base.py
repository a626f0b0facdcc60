"""The Backbone base class, the helpers every model file shares, and the tiny test CNN."""
from __future__ import annotations

import torch
from torch import nn

from kit.models.backbones.registry import no_vit_config, register_backbone
from kit.models.weights import load_module_weights, weights_path
from kit.utils import KitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PHIKON_MODES = ("resize", "interpolate")


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


def group(*modules: nn.Module) -> nn.Module:
    """One block made of several modules (not registered anywhere: no duplicate state keys)."""
    return modules[0] if len(modules) == 1 else nn.ModuleList(modules)


def side(size) -> int:
    """An image or patch side given as an int or an (h, w) pair."""
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def check_mode(name: str, phikon_mode) -> None:
    if phikon_mode not in PHIKON_MODES:
        raise KitError(f"{name}: phikon_mode {phikon_mode!r} unknown; use one of "
                       f"{', '.join(PHIKON_MODES)}")


def vit_input_size(name: str, phikon_mode: str, native: int, patch: int, patch_size: int) -> int:
    """The side patches are fed at: the native size, or the patch size with interpolation."""
    if phikon_mode == "resize":
        return native
    if patch_size % patch:
        raise KitError(f"{name}: phikon_mode 'interpolate' needs a patch size divisible by "
                       f"the ViT patch size {patch} (got {patch_size}); use 'resize' "
                       "or change patches.size")
    return patch_size


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


@register_backbone("tiny_cnn", note="small CNN for tests and benchmarks, no pretrained weights")
def _build_tiny_cnn(weights, patch_size, phikon_mode, vit_config) -> Backbone:
    no_vit_config("tiny_cnn", vit_config)
    path = weights_path("tiny_cnn", weights)
    model = TinyCNN(patch_size)
    if path is not None:
        load_module_weights(model, path, "tiny_cnn")
        model.weights_source = f"local:{path}"
    elif str(weights) == "random":
        model.weights_source = "random"
    return model
