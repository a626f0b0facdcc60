"""Backbones: a registry of feature extractors mapping normalised patches to one vector each.

``create_backbone(name, weights=...)`` builds a :class:`Backbone` (timm-style registry and
factory). Every builder follows the same order: resolve the weights, build the network,
load the weights, wrap it with its normalisation and input size.

Weights (``weights=``):

- ``"auto"``: pretrained weights from ``$KIT_WEIGHTS_DIR/<name>``, else the Hugging Face
  cache (or, for timm, torch's hub cache), else a download through the hub client when the
  network allows. Offline with nothing found: one :class:`KitError` saying where the kit
  looked and how to fetch the weights -- never a silent random fallback. The tiny test
  backbones have no pretrained weights, so for them ``auto`` means random.
- a path: a state-dict file (``.safetensors``, ``.pth``, ``.bin``) or a folder (a
  ``save_pretrained`` folder for the ViTs; ``model.safetensors`` / ``pytorch_model.bin``
  for the others).
- ``"random"``: explicit random initialisation.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
from torch import nn

from kit.utils import KitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Weight file names looked for inside a folder, in order of preference.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt", "model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
PHIKON_REPO = "owkin/phikon"
PHIKON_MODES = ("resize", "interpolate")
# Phikon is a ViT-B/16 (iBOT) at 224 px; these are also transformers' ViTConfig defaults.
PHIKON_CONFIG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, image_size=224, patch_size=16)
TINY_VIT_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, image_size=224, patch_size=16)
NORM_KINDS = {
    # _BatchNorm covers BatchNorm1d/2d/3d and timm's BatchNormAct2d; nn.LayerNorm covers
    # timm's LayerNorm2d; nn.GroupNorm covers timm's GroupNorm/GroupNorm1.
    "batchnorm": nn.modules.batchnorm._BatchNorm,
    "groupnorm": nn.GroupNorm,
    "layernorm": nn.LayerNorm,
}
DOWNLOAD_TIMEOUT_S = 10  # the hub probe; an unreachable hub must not stall "auto" for long

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
def register_backbone(name: str):
    """Decorator: register ``builder(weights, **kwargs) -> Backbone`` under ``name``."""
    def decorate(builder):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = builder
        return builder
    return decorate


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str, weights: str | os.PathLike = "auto", **kwargs) -> Backbone:
    """Build a registered backbone.

    Parameters
    ----------
    name : str
        One of :func:`list_backbones`.
    weights : {"auto", "random"} or path
        See the module docstring.
    patch_size : int, optional
        Side of the cached patches (default: ``kit/conf/patches.yaml``); CNNs and the ViTs
        in ``interpolate`` mode take patches at this size.
    phikon_mode : {"resize", "interpolate"}
        ViT backbones (phikon, tiny_vit): resize patches to the native 224 px, or feed
        them at ``patch_size`` with interpolated position embeddings.
    vit_config : dict, optional
        ViT backbones: ``ViTConfig`` fields overriding the architecture (tests build a tiny
        phikon this way); applied on top of a loaded ``config.json`` too.
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


def _weights_path(name: str, weights) -> Path | None:
    """``None`` for the keywords, else the existing path (KitError when it does not exist)."""
    if str(weights) in ("auto", "random"):
        return None
    path = Path(weights).expanduser()
    if not path.exists():
        raise KitError(f"{name}: weights {path} not found; pass an existing file or folder, "
                       "'auto' (pretrained) or 'random'")
    return path.resolve()


def _no_vit_config(name: str, vit_config) -> None:
    if vit_config:
        raise KitError(f"{name}: vit_config only applies to the ViT backbones (phikon, tiny_vit)")


# --------------------------------------------------------------------------- timm models
def _timm_builder(name: str, arch: str, cls: type[TimmBackbone]):
    def build(weights, patch_size, phikon_mode, vit_config) -> Backbone:
        import timm

        _no_vit_config(name, vit_config)
        path = _weights_path(name, weights)
        source = "random"
        if path is None and str(weights) == "auto":
            cfg = timm.models.get_pretrained_cfg(arch)
            path, source = _find_pretrained(name, cfg.hf_hub_id, need_config=False, url=cfg.url)
        elif path is not None:
            source = f"local:{path}"
        model = timm.create_model(arch, pretrained=False, num_classes=0)
        if path is not None:
            ignore = model.pretrained_cfg.get("classifier") or ()
            ignore = (ignore,) if isinstance(ignore, str) else tuple(ignore)
            _load_module_weights(model, path, name, ignore=ignore)
        return cls(name, model, patch_size, source)
    return build


register_backbone("efficientnet_b0")(_timm_builder("efficientnet_b0", "efficientnet_b0",
                                                   EfficientNetBackbone))
register_backbone("convnext_tiny")(_timm_builder("convnext_tiny", "convnext_tiny",
                                                 ConvNeXtBackbone))


@register_backbone("tiny_cnn")
def _build_tiny_cnn(weights, patch_size, phikon_mode, vit_config) -> Backbone:
    _no_vit_config("tiny_cnn", vit_config)
    path = _weights_path("tiny_cnn", weights)
    model = TinyCNN(patch_size)
    if path is not None:
        _load_module_weights(model, path, "tiny_cnn")
        model.weights_source = f"local:{path}"
    elif str(weights) == "random":
        model.weights_source = "random"
    return model


# --------------------------------------------------------------------------- ViT models
def _vit_builder(name: str, repo: str | None, base_config: dict):
    def build(weights, patch_size, phikon_mode, vit_config) -> Backbone:
        if phikon_mode not in PHIKON_MODES:
            raise KitError(f"{name}: phikon_mode {phikon_mode!r} unknown; use one of "
                           f"{', '.join(PHIKON_MODES)}")
        path = _weights_path(name, weights)
        if path is not None:
            source = f"local:{path}"
        elif str(weights) == "auto" and repo is not None:
            path, source = _find_pretrained(name, repo, need_config=True)
        elif str(weights) == "auto":
            source = f"random ({name} has no pretrained weights)"
        else:
            source = "random"
        model, mean, std = _load_vit(name, path, base_config, vit_config or {})
        native, patch = _side(model.config.image_size), _side(model.config.patch_size)
        if phikon_mode == "resize":
            input_size = native
        else:
            if patch_size % patch:
                raise KitError(f"{name}: phikon_mode 'interpolate' needs a patch size divisible by "
                               f"the ViT patch size {patch} (got {patch_size}); use 'resize' "
                               "or change patches.size")
            input_size = patch_size
        return ViTBackbone(name, model, input_size, mean, std, source)
    return build


register_backbone("phikon")(_vit_builder("phikon", PHIKON_REPO, PHIKON_CONFIG))
register_backbone("tiny_vit")(_vit_builder("tiny_vit", None, TINY_VIT_CONFIG))


def _load_vit(name: str, path: Path | None, base: dict, overrides: dict):
    """``(ViTModel, mean, std)``: random from ``base + overrides``, or loaded from ``path``.

    Files and weights-only folders are linked into a temporary ``save_pretrained`` layout so
    that every load goes through ``from_pretrained`` (which also converts old key names).
    """
    from transformers import ViTConfig, ViTModel

    if path is None:
        return ViTModel(_vit_config(name, ViTConfig(**base), overrides),
                        add_pooling_layer=False), IMAGENET_MEAN, IMAGENET_STD
    folder = path if path.is_dir() else path.parent
    mean, std = _preprocessor_norm(folder)
    with tempfile.TemporaryDirectory(prefix="kit-vit-") as tmp:
        source = _pretrained_layout(name, path, Path(tmp), base)
        config = _vit_config(name, ViTConfig.from_pretrained(source, local_files_only=True),
                             overrides)
        try:
            with _quiet_transformers():
                model, info = ViTModel.from_pretrained(
                    source, config=config, add_pooling_layer=False, local_files_only=True,
                    output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as exc:
            if "mismatch" in str(exc):
                raise KitError(f"{name}: weights in {path} do not fit the model (tensors of "
                               "another shape: another architecture, or a wrong vit_config?)")
            raise KitError(f"{name}: cannot load weights from {path}: {_first_line(exc)}")
    bad = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
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
            raise KitError(f"{name}: vit_config key {key!r} is not a ViTConfig field")
        setattr(config, key, value)
    return config


def _pretrained_layout(name: str, path: Path, tmp: Path, base: dict) -> Path:
    """A folder with ``config.json`` and one weight file for ``from_pretrained``."""
    if path.is_dir() and (path / "config.json").is_file():
        return path
    weight = _weight_file(name, path)
    folder = path if path.is_dir() else path.parent
    config = folder / "config.json"
    if config.is_file():
        (tmp / "config.json").symlink_to(config)
    else:
        from transformers import ViTConfig

        ViTConfig(**base).save_pretrained(tmp)
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


# --------------------------------------------------------------------------- weight files
def _weight_file(name: str, path: Path) -> Path:
    """The weight file for ``path`` (itself, or the preferred file inside a folder)."""
    if path.is_file():
        return path
    for fname in WEIGHT_FILES:
        if (path / fname).is_file():
            return path / fname
    raise KitError(f"{name}: no weight file in {path} (looked for {', '.join(WEIGHT_FILES)})")


def _read_state_dict(name: str, file: Path) -> dict:
    from timm.models import load_state_dict  # unwraps 'state_dict'/'model', strips 'module.'

    try:
        sd = load_state_dict(str(file), weights_only=True)
    except Exception as exc:  # any unreadable file is the user's to fix
        raise KitError(f"{name}: cannot read weights {file}: {_first_line(exc)}")
    if not isinstance(sd, dict) or not sd:
        raise KitError(f"{name}: {file} holds no state dict")
    # A state dict saved from the kit's Backbone wrapper has every key under "model.".
    if all(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items()}
    return sd


def _load_module_weights(module: nn.Module, path: Path, name: str, ignore=()) -> None:
    """Load a state dict strictly; a file for another architecture is an error, not a warning."""
    file = _weight_file(name, path)
    sd = _read_state_dict(name, file)
    sd = {k: v for k, v in sd.items() if not any(k.startswith(p + ".") for p in ignore)}
    own = module.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise KitError(f"{name}: weights {file} do not fit the model ({len(missing)} tensors "
                       f"missing, {len(unexpected)} unexpected, e.g. {example}); pass a "
                       f"{name} state dict in timm's format or --weights random")
    try:
        module.load_state_dict(sd, strict=False)
    except RuntimeError as exc:
        raise KitError(f"{name}: weights {file} have tensors of another shape: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# --------------------------------------------------------------------------- "auto" lookup
def _hf_cache_dir() -> Path:
    """The hub cache as huggingface_hub resolves it, read now (tests change the env)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return xdg / "huggingface" / "hub"


def _offline() -> str | None:
    """The name of the variable that forbids downloads, if one is set."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return var
    return None


def _local_weights(name: str) -> tuple[Path | None, str]:
    """``$KIT_WEIGHTS_DIR/<name>`` (folder or ``<name>.<suffix>`` file) and a description."""
    root = os.environ.get("KIT_WEIGHTS_DIR")
    if not root:
        return None, f"$KIT_WEIGHTS_DIR/{name} (KIT_WEIGHTS_DIR is not set)"
    base = Path(root).expanduser() / name
    for candidate in (base, *(base.with_name(name + s) for s in WEIGHT_SUFFIXES)):
        if candidate.exists():
            return candidate.resolve(), str(base)
    return None, f"{base} (absent)"


def _from_hf_cache(repo: str, cache: Path, need_config: bool) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    def cached(fname):
        hit = try_to_load_from_cache(repo, fname, cache_dir=cache)
        return Path(hit) if isinstance(hit, str) else None

    weight = next((p for p in map(cached, ("model.safetensors", "pytorch_model.bin")) if p), None)
    if weight is None:
        return None
    if not need_config:
        return weight
    config = cached("config.json")
    return weight.parent if config is not None and config.parent == weight.parent else None


def _download(repo: str, cache: Path, need_config: bool) -> Path:
    from huggingface_hub import hf_hub_download, model_info

    # A short probe first: an unreachable hub fails here within DOWNLOAD_TIMEOUT_S.
    names = {s.rfilename for s in (model_info(repo, timeout=DOWNLOAD_TIMEOUT_S).siblings or [])}
    weight = next((f for f in ("model.safetensors", "pytorch_model.bin") if f in names), None)
    if weight is None:
        raise RuntimeError(f"{repo} has neither model.safetensors nor pytorch_model.bin")
    path = Path(hf_hub_download(repo, weight, cache_dir=cache, etag_timeout=DOWNLOAD_TIMEOUT_S))
    if not need_config:
        return path
    for extra in ("config.json", "preprocessor_config.json"):
        if extra in names:
            hf_hub_download(repo, extra, cache_dir=cache, etag_timeout=DOWNLOAD_TIMEOUT_S)
    return path.parent


def _find_pretrained(name: str, repo: str, need_config: bool,
                     url: str | None = None) -> tuple[Path, str]:
    """Path and source of pretrained weights for ``weights="auto"``, or one clear KitError."""
    local, where = _local_weights(name)
    if local is not None:
        return local, f"local:{local}"
    looked = [where]
    cache = _hf_cache_dir()
    hit = _from_hf_cache(repo, cache, need_config)
    if hit is not None:
        return hit, f"hf-cache:{repo}"
    looked.append(f"the Hugging Face cache {cache} ({repo} not there)")
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if cached.is_file():
            return cached, f"timm-cache:{cached}"
        looked.append(f"the timm/torch cache {cached} (absent)")
    offline = _offline()
    if offline:
        why = f"{offline} is set, so nothing was downloaded"
    else:
        try:
            return _download(repo, cache, need_config), f"hub:{repo}"
        except Exception as exc:  # no network, proxy, gated repo...: all end in the same advice
            why = f"downloading {repo} failed ({_first_line(exc)})"
    raise KitError(
        f"{name}: no pretrained weights found: looked in {'; '.join(looked)}; {why}. "
        f"Fetch them on a machine with internet: `hf download {repo} --local-dir {name}` "
        f"(older clients: `huggingface-cli download {repo} --local-dir {name}`), copy the "
        f"folder here and pass --weights PATH/{name} or set KIT_WEIGHTS_DIR=PATH; or copy that "
        f"machine's Hugging Face cache to {cache}; --weights random trains from scratch")


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
