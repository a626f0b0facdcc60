"""Feature fusion (``cv a+b``): one head on the concatenated cached embeddings of several
frozen backbones, each cache built and keyed exactly as a single backbone's run builds it."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kit.config import Layered
from kit.models.backbones import Backbone, list_backbones
from kit.models.normalize import normalize_batch
from kit.training.checkpoints import weights_digest
from kit.training.feature_cv import FeatureCV
from kit.training.features import Features, cache_backbone, cache_key, load_or_embed
from kit.utils import KitError, sha256_text

log = logging.getLogger(__name__)

SEP = "+"
WEIGHT_WORDS = ("auto", "random")


# --------------------------------------------------------------------------- names
def split_name(name: str) -> list[str]:
    """The registered backbones of a run name: ``["a", "b"]`` for ``a+b``, ``[name]`` for one.

    Raises
    ------
    KitError
        An empty or unregistered part (listing the registered names), or a part named twice.
    """
    parts = str(name).split(SEP)
    known = list_backbones()
    unknown = [p for p in parts if p not in known]
    if unknown:
        what = "backbone" if len(parts) == 1 else f"backbone in {name!r}"
        raise KitError(f"unknown {what}: {unknown[0]!r}; known backbones: {', '.join(known)} "
                       f"(join two with {SEP} to fuse their embeddings, e.g. "
                       f"{known[0]}{SEP}{known[-1]})")
    if len(set(parts)) != len(parts):
        raise KitError(f"{name}: a backbone is named twice; fuse different backbones")
    return parts


def parse_weights(name: str, values) -> str | dict[str, str]:
    """``--weights`` values for the run ``name``: one value (``auto``, ``random``, a path) for
    a single backbone; for a fused run ``part=VALUE`` per backbone, the rest ``auto``, or a
    bare ``auto``/``random`` for all of them. Returns a string, or ``{part: value}``."""
    parts = split_name(name)
    values = [str(v) for v in (values or [])] or ["auto"]
    given: dict[str, str] = {}
    bare = []
    for v in values:
        part, eq, rest = v.partition("=")
        if eq and part in parts:
            if part in given:
                raise KitError(f"--weights {part}= given twice; give one value per backbone")
            given[part] = rest
        else:
            bare.append(v)
    if len(parts) == 1:
        if len(bare) + len(given) != 1:
            raise KitError(f"--weights: give one value for {name} (got {len(values)})")
        return bare[0] if bare else given[parts[0]]
    if len(bare) > 1 or (bare and bare[0] not in WEIGHT_WORDS):
        raise KitError(f"--weights {bare[0]}: a fused run takes one value per backbone, "
                       f"e.g. --weights {parts[0]}=PATH --weights {parts[1]}=auto "
                       f"(or a bare auto|random for all of {', '.join(parts)})")
    default = bare[0] if bare else "auto"
    return {p: given.get(p, default) for p in parts}


def part_weights(parts: list[str], weights) -> dict[str, str]:
    """The weights of each part from run_cv's ``weights``: a ``{part: value}`` dict (parts
    left out: ``auto``) or one ``auto``/``random`` for all."""
    if isinstance(weights, dict):
        extra = sorted(set(weights) - set(parts))
        if extra:
            raise KitError(f"weights for {', '.join(extra)}, which is not part of "
                           f"{SEP.join(parts)}")
        return {p: str(weights.get(p, "auto")) for p in parts}
    return parse_weights(SEP.join(parts), [str(weights)])


# --------------------------------------------------------------------------- the backbones
class FusedBackbone(Backbone):
    """The parts side by side: ``forward(x)`` maps ``B x 3 x S x S`` pixels in [0, 1] (its
    ``mean`` 0, ``std`` 1) to the concatenation of every part's features, each part's input
    resized and normalised as its own cache was, so a fused fold's ``model.pt`` is a whole
    pixel model like a single backbone's."""

    def __init__(self, parts: dict[str, Backbone], input_size: int):
        super().__init__(SEP.join(parts), sum(b.num_features for b in parts.values()),
                         input_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                         weights_source={n: b.weights_source for n, b in parts.items()})
        self.parts = torch.nn.ModuleDict(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(normalize_batch(x, b.mean, b.std, b.input_size))
                          for b in self.parts.values()], dim=1)


@dataclass
class Fusion:
    """A fused run's parts, built (frozen, seeded) as each one's own cv builds them."""

    name: str
    weights: dict[str, str]
    backbones: dict[str, Backbone]
    digests: dict[str, str]
    keys: dict[str, dict[str, str]]  # part -> {"train": cache key, "test": cache key}

    def record(self) -> dict:
        """What the run's hash, config.yaml and metrics.json keep of the parts."""
        return {"parts": list(self.backbones),
                "input_width": sum(b.num_features for b in self.backbones.values()),
                "backbones": {n: {"weights": self.weights[n],
                                  "weights_source": b.weights_source,
                                  "weights_sha256": self.digests[n],
                                  "num_features": int(b.num_features),
                                  "input_size": int(b.input_size),
                                  "feature_keys": self.keys[n]}
                              for n, b in self.backbones.items()}}


def check_path(name: str, cfg: dict, training_path: str) -> None:
    """KitError unless the settings keep every part frozen: fusion is the cached-embedding
    path only."""
    if training_path == "feature_cache":
        return
    why = []
    if cfg["train_norm"]:
        why.append(f"train_norm {cfg['train_norm']}")
    if int(cfg["unfreeze_last"]):
        why.append(f"unfreeze_last {cfg['unfreeze_last']}")
    why = ", ".join(why) or "--no-feature-cache"
    raise KitError(f"cv {name}: a fused run trains one head on cached embeddings only, but "
                   f"these settings train on pixels ({why}); drop them (--train-norm none, "
                   "--unfreeze-last 0, no --no-feature-cache)")


def frozen_defaults(name: str, settings: Layered) -> Layered:
    """``settings`` as given for a single backbone; a fused run's settings freeze every part
    whole (``train_norm: []``) unless the user's overrides say otherwise. KitError for an
    unknown part."""
    if len(split_name(name)) == 1 or not isinstance(settings, Layered):
        return settings  # (train_config refuses anything but the command's settings)
    if settings.overrides.get("train_norm") is None:
        settings = settings.plus({"train_norm": []})
    return settings


def build(name: str, weights, cfg: dict, training_path: str, views, train, test, seed: int,
          device) -> Fusion | None:
    """Build every part of ``name`` as :func:`kit.training.cv` builds a single frozen backbone
    (seeded with ``seed``, input size, AdaBN for random weights) and key its caches; KitError
    when the settings (``training_path``) would need pixels. None for a single backbone."""
    parts = split_name(name)
    if len(parts) == 1:
        return None
    check_path(name, cfg, training_path)
    wts = part_weights(parts, weights)
    backbones, digests, keys = {}, {}, {}
    for p in parts:
        bb = cache_backbone(p, cfg, train, wts[p], seed, device)
        backbones[p], digests[p] = bb, weights_digest(bb)
        keys[p] = {split: cache_key(bb, ps, views, cfg["features"], device, digests[p])
                   for split, ps in (("train", train), ("test", test))}
    return Fusion(name, wts, backbones, digests, keys)


def features(ctx) -> tuple[FusedBackbone, FeatureCV]:
    """The fused backbone and a :class:`kit.training.feature_cv.FeatureCV` over the parts' cached
    embeddings, concatenated per patch and view (each cache read or embedded by
    :func:`kit.training.features.load_or_embed`, as the part's own run does)."""
    fusion, cfg = ctx.fused, ctx.cfg
    per_split = {}
    for split, patches in (("train", ctx.train), ("test", ctx.test)):
        found = []
        for n, bb in fusion.backbones.items():
            f = load_or_embed(bb, patches, ctx.paths, split, ctx.views, cfg["features"],
                              ctx.device, fusion.digests[n])
            bb.cpu()  # one embedding part at a time on the accelerator, however many parts
            if f.key != fusion.keys[n][split]:  # the run's hash named another cache
                raise KitError(f"{f.path}: cache key differs from the one {fusion.name}'s "
                               "config hash was made with; rerun the same command")
            found.append(f)
        per_split[split] = _concat(found, ctx.paths.features_dir, fusion)
    log.info(f"{fusion.name}: fused embeddings of {' + '.join(fusion.backbones)}: "
             f"{per_split['train'].array.shape[-1]} features per patch "
             f"({' + '.join(str(b.num_features) for b in fusion.backbones.values())})")
    fcv = FeatureCV(per_split["train"], ctx.folds, cfg, ctx.views, per_split["test"],
                    ctx.device, ctx.seed, int(cfg["features"]["threads"]), task=ctx.task)
    return FusedBackbone(fusion.backbones, int(ctx.train.array.shape[2])), fcv


def _concat(found: list[Features], where: Path, fusion: Fusion) -> Features:
    """One split's parts side by side (float32 in memory, as FeatureCV holds one cache)."""
    first = found[0]
    for f in found[1:]:
        same_images = np.array_equal(f.samples.sample_index.values,
                                     first.samples.sample_index.values)
        if f.views != first.views or not same_images:
            raise KitError(f"{f.path} and {first.path}: the caches of a fused run list different "
                           "images or views; rerun ./run.sh patches and delete runs/features/")
    widths = np.cumsum([0] + [f.array.shape[-1] for f in found])
    array = np.empty(first.array.shape[:-1] + (int(widths[-1]),), np.float32)
    for f, a, b in zip(found, widths[:-1], widths[1:]):
        array[..., a:b] = f.array
    key = sha256_text("|".join(f.key for f in found))
    meta = {"weights_sha256": dict(fusion.digests), "dtype": first.meta.get("dtype"),
            "parts": {n: {"key": f.key, "dir": str(f.path), "hit": f.hit}
                      for n, f in zip(fusion.backbones, found)}}
    return Features(array, first.samples, first.views, key, where, all(f.hit for f in found),
                    meta)
