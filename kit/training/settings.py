"""The resolved training config (train.yaml + augment.yaml) and what follows from it: the
views, and which training path (pixels or cached embeddings) cv takes."""
from __future__ import annotations

from kit.config import Layered, dotted_to_nested
from kit.schema import check
from kit.task import default_task
from kit.training.finetune import schedule_opens
from kit.training.tta import get_views
from kit.utils import KitError


def train_config(settings: Layered, params: dict | None = None,
                 feature_cache: bool = True) -> dict:
    """The training config one run uses: ``train.yaml`` with ``augment.yaml`` as ``augment``
    and ``features.yaml`` (the embedding cache) as ``features``, so that one ``--set``
    reaches all.

    Parameters
    ----------
    settings : kit.config.Layered
        The defaults and the user's overrides, as the command resolved them
        (:func:`kit.config.train_settings`); the overrides apply last.
    params : dict, optional
        Dotted keys (``{"head.depth": 2, "augment.cutmix_alpha": 0.5, "lr": 3e-4}``), as in
        ``runs/tune/<bb>/best.yaml``; applied before the overrides.
    feature_cache : bool
        Whether cv may train on cached embeddings (False: ``--no-feature-cache``); it decides
        what ``head.type: auto`` becomes (:func:`resolve_head_type`).
    """
    if not isinstance(settings, Layered):
        raise KitError("the training stages take the settings their command resolved: "
                       "kit.config.train_settings(overrides) (got "
                       f"{type(settings).__name__})")
    nested = dotted_to_nested(params, "params") if params else None
    cfg = settings.resolve(nested)
    cfg = check("train", cfg, "with --params" if params else None)
    head_given = set((settings.overrides.get("head") or {})) | set(((nested or {}).get("head")
                                                                    or {}))
    return _normalise(cfg, resolve_head_type(cfg, head_given, feature_cache))


# The head keys that only an MLP head (or its pooling) reads: setting one asks for that head.
MLP_KEYS = ("pool", "depth", "width", "dropout", "activation", "norm")


def resolve_head_type(cfg: dict, head_given=(), feature_cache: bool = True) -> str:
    """What ``head.type`` trains: ``mlp`` or ``logreg`` as set; ``auto`` is the linear probe
    when the heads train on cached embeddings (a frozen backbone and the cache allowed) and no
    MLP key (:data:`MLP_KEYS`) was set by the user or the params, else the MLP.

    Why: on cached embeddings of a frozen stand-in the probe scored at least as well on
    held-back test labels as the MLP in every regime measured, at less cost (issue 23,
    docs/benchmarks.md, ``bench noise``); on pixels there is no probe.
    """
    kind = str(cfg["head"]["type"]).lower()
    if kind != "auto":
        return kind
    on_cache = feature_cache and nothing_trains(cfg)
    return "logreg" if on_cache and not set(head_given) & set(MLP_KEYS) else "mlp"


def _normalise(cfg: dict, head_type: str) -> dict:
    """The settings one setting implies, so that every consumer sees one form (the values
    were checked against kit.schema already)."""
    head = cfg["head"]
    head["type"] = head_type
    if head["type"] == "logreg":
        # A linear probe is fitted on image-mean embeddings; mean_logprob pooling of its
        # patch logits is that model exactly (and attention has nothing to train).
        head["pool"] = "mean_logprob"
    issues = cfg["label_issues"]
    mode = issues["mode"]
    issues["mode"] = "off" if mode is False or mode is None else str(mode).lower()
    return cfg



def task_salt(task) -> dict:
    """What a task adds to a hash or key: nothing for the built-in AN2DL task (or None), so
    that its run hashes and cache keys stay what they were; ``{"task": fingerprint}`` for any
    other task (its classes, metric and layout decide what a run computes)."""
    if task is None or task.fingerprint == default_task().fingerprint:
        return {}
    return {"task": task.fingerprint}


def tta_views(spec) -> tuple[str, ...]:
    """View names from the ``tta`` config: ``none`` (original only), a set name of
    :mod:`kit.training.tta` (``flips``, ``dihedral``) or a list of view names."""

    if isinstance(spec, str) and spec.strip().lower() in ("none", "off", ""):
        return ("id",)
    return get_views(spec)


def nothing_trains(cfg: dict) -> bool:
    """Whether a training config leaves the whole backbone frozen (no norm layer, no block
    opened by ``unfreeze_last`` or ``unfreeze_schedule``), the case where :func:`features_cv`
    replaces cv's training at a fraction of the cost.

    In feature space the training augmentation is the random choice among the cached views;
    colour jitter and CutMix (pixel operations) have no equivalent there.
    """
    kinds = cfg["train_norm"] or ()
    if isinstance(kinds, str):
        kinds = kinds.split(",")
    kinds = [str(k).strip().lower() for k in kinds if str(k).strip().lower() not in ("", "none")]
    return (not kinds and int(cfg["unfreeze_last"]) == 0
            and not schedule_opens(cfg["unfreeze_schedule"]))


PIXEL_AUGMENT = ("augment.cutmix_alpha", "augment.color_jitter.p", "augment.he_stain.p",
                 "augment.rot90", "augment.hflip", "augment.vflip")


def training_path(cfg: dict, feature_cache: bool = True) -> str:
    """``feature_cache`` when nothing in the backbone trains
    (:func:`kit.training.settings.nothing_trains`) and the cache is allowed, else ``pixels``."""

    return "feature_cache" if feature_cache and nothing_trains(cfg) else "pixels"


def pixel_augment_not_applied(cfg: dict) -> dict:
    """The pixel augmentation settings of ``cfg`` that the feature-cache path cannot apply
    (non-zero probabilities / alpha), as dotted keys."""
    out = {}
    for key in PIXEL_AUGMENT:
        node = cfg
        for part in key.split("."):
            node = node[part]
        if node:
            out[key] = node
    return out
