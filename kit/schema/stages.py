"""The settings of the data, blend, tune, submit and report stages: one group per YAML file
under ``kit/conf/``, one field per key with its type, range or choices and description."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from kit.schema.base import Group, key
from kit.schema.values import (
    Bool,
    Float,
    Int,
    NonNegative,
    NonNegativeInt,
    Pixel,
    PositiveInt,
    Probability,
    between,
)

# --------------------------------------------------------------------------- clean


class Green(Group):
    min_g: Probability = key("a green pixel has G above this (0-1 scale)")
    margin: Probability = key("... and G - R, G - B above this")
    min_share: Probability = key("an image is flagged when green pixels cover more than this")


class Cartoon(Group):
    min_saturation: Probability = key("coloured pixels: HSV saturation above this")
    hue_min: between(0, 360) = key("non-H&E hue range start, degrees")
    hue_max: between(0, 360) = key("non-H&E hue range end, degrees")
    smooth_gradient: NonNegative = key("a pixel is smooth below this local gradient (grey "
                                       "levels)")
    colour_weight: Probability = key("weight of the hue share in the score (rest: smoothness)")
    strict: NonNegative = key("flag without help from duplicate masks above this score (> 1: "
                              "never)")
    paired: NonNegative = key("in a group sharing a mask file, flag members above this (> 1: "
                              "never)")


class NearDuplicates(Group):
    hash_size: between(2, kind=Int) = key("hash_size x hash_size bits per perceptual hash")
    image_distance: between(-1, kind=Int) = key("max differing bits between two image "
                                                "hashes; -1 = off")
    mask_distance: between(-1, kind=Int) = key("the same for mask hashes; -1 = off")
    mask_min_share: Probability = key("masks covering less of the image are not compared")
    warn_group_size: between(2, kind=Int) = key("warn about larger groups")


class Clean(Group):
    """Junk detection in the training set (and a report on the test set)."""

    work_side: between(16, kind=Int) = key("images are shrunk to about this short side")
    green: Green = key("the green-stain rule")
    cartoon: Cartoon = key("the cartoon score")
    borderline: NonNegativeInt = key("review page: unflagged images shown under each threshold")
    thumb_side: between(16, kind=Int) = key("review page thumbnail side in px")
    workers: NonNegativeInt = key("decoding processes; 0 = one per core")
    parallel_min: NonNegativeInt = key("datasets smaller than this are scanned in-process")
    near_duplicates: NearDuplicates = key("near-duplicate groups kept in one fold")


# --------------------------------------------------------------------------- patches


class StainNorm(Group):
    method: Literal["none", "macenko"] = key("stain normalisation of every patch")
    reference: str = key("\"\" = Macenko's reference stains, or an RGB image file as target")
    intensity: between(100, 255) = key("Io: the light level of an empty slide (the background)")
    alpha: between(0, 25) = key("percentile (in %) of the extreme stain angles")
    beta: between(0.01, 1) = key("optical density below which a pixel is background")
    min_tissue: Probability = key("least tissue share for a reliable estimate")


class Patches(Group):
    """Mask-guided patches: windows slid over each image, the top_k kept."""

    size: Literal["auto"] | PositiveInt = key(
        "window side in px, or auto: the native size of patches --backbone")
    stride: PositiveInt = key("step between windows in px")
    top_k: PositiveInt = key("windows kept per image")
    select: Literal["top_k", "per_region"] = key(
        "top_k: most mask coverage | per_region: shared among the mask's regions by area")
    min_region_px: PositiveInt = key("per_region: regions this large are sure of a window")
    tissue_threshold: Pixel = key("channel minimum below this counts as tissue")
    workers: NonNegativeInt = key("decoding processes; 0 = one per core")
    pad_value: Pixel = key("fill outside an image smaller than the window")
    stain_norm: StainNorm = key("stain normalisation (off by default)")


# --------------------------------------------------------------------------- folds


class Folds(Group):
    """Stratified, image-grouped K-fold over the clean training images."""

    n_splits: between(2, kind=Int) = key("folds")


# --------------------------------------------------------------------------- blend


class Blend(Group):
    """The blend search: weights of the runs, then class biases."""

    iterations: NonNegativeInt = key("greedy forward-selection steps after the start")
    init: Literal["equal", "best", "both"] = key("start of the greedy path")
    init_size: PositiveInt = key("init best: the number of best single runs to start from")
    bags: NonNegativeInt = key("bootstrap resamples whose weights are averaged; 0 = off")
    biases: Literal["auto"] | Bool = key(
        "per-class additive biases on log p: true | false | auto (applied only when their "
        "nested paired gain is positive; the choice is recorded)")
    bias_low: Float = key("lowest bias of the grid")
    bias_high: Float = key("highest bias of the grid")
    bias_steps: between(2, kind=Int) = key("grid points between bias_low and bias_high")
    bias_rounds: PositiveInt = key("coordinate-ascent sweeps over the classes")
    eps: between(0, 0.5, low_open=True, high_open=True) = key(
        "probabilities are clipped to at least this before logs")
    prior: Literal["train", "em"] = key(
        "the test set's class mix: train (the OOF labels') | em (estimated by EM)")
    em_tol: between(0, low_open=True) = key("EM stops when no class's share moves more")
    em_max_iter: PositiveInt = key("EM steps at most")
    em_alpha: between(0, 1, low_open=True) = key(
        "level of the test that rejects the OOF mix (1 = always use EM's)")

    @model_validator(mode="after")
    def _grid(self):
        if self.bias_high <= self.bias_low:
            raise ValueError(f"bias_high ({self.bias_high}) must be above bias_low "
                             f"({self.bias_low})")
        return self


# --------------------------------------------------------------------------- tune


class Pruner(Group):
    p_threshold: between(0, 1, low_open=True) = key("Wilcoxon p-value below which a trial is "
                                                    "pruned")
    n_startup_steps: NonNegativeInt = key("folds a trial runs before it can be pruned")


class Tune(Group):
    """The Optuna search."""

    objective: Literal["features", "full"] = key(
        "features: heads on cached embeddings | full: trains as cv does")
    trials: NonNegativeInt = key("stop when the study holds this many finished trials; 0 = "
                                 "no bound")
    timeout: NonNegative = key("seconds a run keeps starting trials; 0 = no limit")
    n_jobs: PositiveInt = key("threads of one process sharing a study")
    folds_per_trial: NonNegativeInt = key("folds per trial during the search; 0 = all")
    estimate_trials: PositiveInt = key("tune --estimate: trials of each outer fold's search")
    storage: str = key("Optuna storage URL or journal file; \"\" = sqlite runs/optuna.db")
    heartbeat_interval: PositiveInt = key("RDB storages: heartbeat seconds")
    grace_period: PositiveInt = key("RDB storages: seconds without heartbeat before a retry")
    max_retry: NonNegativeInt = key("retries of a trial whose worker stopped")
    pruner: Pruner = key("Wilcoxon pruning of per-fold scores")
    n_startup_trials: NonNegativeInt = key("random trials before TPE")
    warm_start_top: NonNegativeInt = key("--warm-start-from: best trials enqueued")
    space: dict[str, dict[str, Any] | None] = key(
        "search space: default and per-backbone entries of dotted keys")


# --------------------------------------------------------------------------- submit, report


class Submit(Group):
    """Uploading to Kaggle."""

    competition: str = key("Kaggle slug unless -c, the manifest or the task's kaggle names one")
    poll_interval: between(0, low_open=True) = key("--wait: seconds between status polls")
    wait_timeout: NonNegative = key("--wait: seconds to wait for a score")


class Report(Group):
    """runs/report.html."""

    thumb_side: between(16, kind=Int) = key("junk thumbnails' longest side in px")
    max_thumbs: NonNegativeInt = key("junk thumbnails shown at most")
    reliability_bins: between(2, kind=Int) = key("confidence bins of the reliability diagram")
    attention_images: NonNegativeInt = key("attention heads: OOF images shown per run")
    label_issues_top: NonNegativeInt = key("suspected label errors shown per run")
