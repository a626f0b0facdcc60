"""The training settings: ``train.yaml`` with its sections ``augment`` (augment.yaml),
``features`` (features.yaml), ``head`` and ``label_issues``. One field per key, with its type,
its range or choices, and a one-line description (``./run.sh config train``)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator

from kit.schema.base import Group, key
from kit.schema.values import (
    Bool,
    Int,
    NonNegative,
    NonNegativeInt,
    PositiveInt,
    Probability,
    Schedule,
    Views,
    between,
    off_or,
)

Amp = Annotated[Literal["auto", "off", "bf16", "fp16"],
                BeforeValidator(lambda v: "off" if v is False or v is None else v)]
NormKind = Literal["batchnorm", "groupnorm", "layernorm", "none"]


def _norm_kinds(value):
    # A string ("batchnorm,layernorm", "none") is what --train-norm writes: its kinds are
    # checked like the list's.
    if isinstance(value, str):
        bad = [k for k in (k.strip().lower() for k in value.split(",")) if k
               and k not in NormKind.__args__]
        if bad:
            raise ValueError(f"unknown kind(s) {', '.join(bad)}; expected batchnorm, groupnorm, "
                             "layernorm or none")
    return value


TrainNorm = Annotated[list[NormKind] | str | None, AfterValidator(_norm_kinds)]


class ColorJitter(Group):
    p: Probability = key("probability that a patch is jittered")
    brightness: between(0, 1, high_open=True) = key("brightness factor drawn in [1 - s, 1 + s]")
    contrast: between(0, 1, high_open=True) = key("contrast factor drawn in [1 - s, 1 + s]")
    saturation: between(0, 1, high_open=True) = key("saturation factor drawn in [1 - s, 1 + s]")
    hue: between(0, 0.5) = key("hue shift in [-hue, hue], a fraction of the colour wheel")


class HEStain(Group):
    p: Probability = key("probability of H&E stain jitter (albumentations HEStain); 0 = off")
    method: Literal["random_preset", "preset", "macenko", "vahadane"] = key(
        "stain matrix: one of the published presets at random, the named preset, or the "
        "patch's own (macenko, vahadane: slower)")
    preset: Literal["ruifrok", "macenko", "standard", "high_contrast", "h_heavy", "e_heavy",
                    "dark", "light"] = key("the preset matrix with method preset "
                                           "(albumentations' published matrices)")
    scale: between(0, 0.5) = key("each stain's concentration times a factor in [1-s, 1+s]")
    shift: between(0, 0.3) = key("each stain's concentration shifted in [-shift, shift]")
    augment_background: Bool = key("jitter background pixels too")


class Augment(Group):
    """Patch-level training augmentation (pixels path)."""

    hflip: Probability = key("probability of a horizontal flip")
    vflip: Probability = key("probability of a vertical flip")
    rot90: Probability = key("probability of a random multiple of 90 degrees")
    color_jitter: ColorJitter = key("colour jitter of brightness, contrast, saturation, hue")
    he_stain: HEStain = key("H&E stain jitter")
    cutmix_alpha: NonNegative = key("CutMix Beta(alpha, alpha) area; 0 = off")


class Features(Group):
    """The embedding cache (heads on frozen backbones' cached embeddings)."""

    batch_size: PositiveInt = key("patches per forward pass while embedding")
    dtype: Literal["float16", "float32"] = key("on-disk precision of the cached embeddings")
    device: Literal["auto", "cpu", "cuda", "mps"] = key(
        "device for embedding and head training (auto: cuda > mps > cpu)")
    amp: Amp = key("autocast while embedding (auto: bf16/fp16 on CUDA, off elsewhere)")
    threads: NonNegativeInt = key("torch threads while training heads on the CPU; 0 = torch's")


class LabelIssues(Group):
    """Suspected label errors, found inside each fold."""

    mode: off_or("drop", "weight") = key(
        "off | drop (train without flagged images) | weight (label quality as sample weight)")
    inner_folds: between(2, kind=Int) = key("folds of the inner cross-validation")
    model: Literal["head", "logreg"] = key("model of the inner CV: this head, or the probe")
    min_weight: Probability = key("weight mode: the smallest sampling weight an image gets")


class Head(Group):
    """The classifier on the backbone's patch embeddings."""

    type: Annotated[Literal["auto", "mlp", "logreg"],
                    BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)] = key(
        "auto (logreg on cached embeddings unless an MLP or pool key is set, else mlp) | mlp "
        "(the layers below) | logreg (linear probe, cached embeddings only)",
        path_free=False)
    standardize: Bool = key("standardise features with the fold's training statistics")
    pool: Literal["mean_prob", "mean_logprob", "attention"] = key(
        "how an image's patches make one prediction")
    depth: NonNegativeInt = key("hidden layers of the MLP (0 = linear)")
    width: PositiveInt = key("units per hidden layer")
    dropout: between(0, 1, high_open=True) = key("dropout probability after each hidden layer")
    activation: Literal["relu", "gelu"] = key("activation of the hidden layers")
    norm: Literal["none", "layernorm", "batchnorm"] = key("normalisation of the hidden layers")


class Train(Group):
    """Training one model per fold (cv, tune, the benches)."""

    epochs: PositiveInt = key("training epochs per fold (the most, with early stopping)")
    batch_size: PositiveInt = key("training batch size (lower it on out-of-memory)")
    eval_batch_size: NonNegativeInt = key(
        "prediction batch size; 0 = 2 x batch_size", path_free=True)
    lr: NonNegative = key("AdamW learning rate of the head (0: nothing moves)")
    weight_decay: NonNegative = key("AdamW weight decay")
    warmup_epochs: NonNegative = key("linear warm-up epochs before the cosine decay")
    min_lr_ratio: Probability = key("the cosine decay ends at lr * min_lr_ratio")
    patience: NonNegativeInt = key("epochs without a better validation score before "
                                   "stopping; 0 = never")
    early_stopping: Literal["auto", "inner", "refit", "none", "oof"] = key(
        "how a fold chooses its epoch (oof: optimistic scores)", path_free=True)
    inner_folds: between(2, kind=Int) = key(
        "folds of the inner split early stopping uses", path_free=True)
    num_workers: Literal["auto"] | NonNegativeInt = key(
        "DataLoader processes (auto: 0 on CPU/MPS, up to 8 on CUDA)", path_free=True)
    amp: Amp = key("mixed precision (auto: bf16/fp16 on CUDA, off on CPU/MPS)", path_free=True)
    channels_last: Literal["auto"] | Bool = key(
        "channels_last memory format (auto: on CUDA)", path_free=True)
    label_smoothing: between(0, 1, high_open=True) = key(
        "label smoothing of the targets", path_free=True)
    class_balance: Literal["none", "loss", "sampler"] = key(
        "class imbalance: none | class-weighted loss | balanced sampler", path_free=True)
    tta: Views = key("test-time views: flips | dihedral | none, or a list of views", path_free=True)
    bag: PositiveInt = key("heads trained per fold with their own seeds, averaged", path_free=True)
    label_issues: LabelIssues = key(
        "suspected label errors, found inside each fold", path_free=True)
    head: Head = key("the classifier head", path_free=True)
    train_norm: TrainNorm = key(
        "backbone norm layers left trainable: batchnorm, groupnorm, layernorm (empty: none)",
        path_free=True)
    unfreeze_last: NonNegativeInt = key("backbone blocks trained from the end", path_free=True)
    unfreeze_schedule: Schedule = key(
        "gradual unfreezing: {epoch: blocks}, \"0:0,3:1,10:all\", \"gradual:K[:N]\"; [] = off",
        path_free=True)
    lr_decay: between(0, 1, low_open=True) = key(
        "layer-wise lr decay: block -j trains at lr * lr_decay^j; 1 = off")
    input_size: NonNegativeInt = key(
        "side patches are resized to; 0 = the backbone's own", path_free=True)
    patches_size: Literal["auto"] | PositiveInt = key(
        "the patch cache to train on: auto or a window size in px")
    phikon_mode: Literal["resize", "interpolate"] = key(
        "ViTs on small patches: resize to 224 | interpolate position embeddings", path_free=True)
    recalibrate_bn: Literal["auto"] | Bool = key(
        "AdaBN before training (auto: for random weights only)")
    checkpoint: Literal["auto", "full", "trainable"] = key(
        "fold checkpoint contents (auto: whole model for random weights)", path_free=True)
    augment: Augment = key("patch augmentation (augment.yaml)", path_free=True)
    features: Features = key("the embedding cache (features.yaml)")
