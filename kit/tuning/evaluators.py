"""The two ways a tune trial scores its params, fold by fold: heads on one embedding cache
(``features``) or cv itself in a scratch folder (``full``)."""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kit import PROB_COLUMNS
from kit.artifacts import read_folds, read_oof
from kit.config import Layered
from kit.data.patches import patches_for
from kit.log import capture
from kit.metrics import macro_f1, to_indices
from kit.models.backbones import native_size
from kit.paths import Paths
from kit.training.cv import run_cv
from kit.training.feature_cv import prepare

log = logging.getLogger(__name__)


@dataclass
class FoldScore:
    """One fold's image-level OOF predictions and macro F1."""

    fold: int
    y: np.ndarray
    probs: np.ndarray
    macro_f1: float


def pooled_f1(scores) -> float:
    """Macro F1 of the pooled OOF predictions (image level): cv's ``oof_macro_f1``."""
    scores = list(scores)
    return macro_f1(np.concatenate([s.y for s in scores]),
                    np.concatenate([s.probs for s in scores]))


class FeaturesEvaluator:
    """Trials of the ``features`` objective: one embedding cache, a head per fold and trial."""

    objective = "features"

    def __init__(self, backbone: str, paths, settings: Layered, weights="auto", seed: int = 42,
                 device=None, data=None):  # data: as the full objective's (cv's), unread here
        self._init(prepare(backbone, paths, settings=settings, weights=weights, seed=seed,
                           device=device, with_test=False))

    @classmethod
    def from_feature_cv(cls, fcv) -> "FeaturesEvaluator":
        """An evaluator over an already prepared :class:`kit.training.feature_cv.FeatureCV`."""
        self = cls.__new__(cls)
        self._init(fcv)
        return self

    def _init(self, fcv) -> None:
        self.fcv, self.n_folds, self.last_fit = fcv, fcv.n_folds, None
        self.settings = fcv.settings
        self.context = {"patch_key": fcv.train.meta.get("patch_key"),
                        "weights_sha256": fcv.train.meta.get("weights_sha256")}

    def trial(self, params: dict, name: str, exclude=()):
        """``(run_fold, cleanup)`` for one trial with ``params`` (dotted keys).

        ``exclude``: folds that neither train nor score (the outer fold of a nested
        estimate, which must play no part in its own search).
        """
        fcv = self.fcv.configure(params)
        exclude = tuple(int(e) for e in exclude)

        def run(k: int) -> FoldScore:
            p = fcv.fold(k, exclude=exclude) if exclude else fcv.fold(k)
            self.last_fit = p.fit
            return FoldScore(k, p.y, p.probs, p.macro_f1)
        return run, lambda: None


class Excluding:
    """An evaluator whose trials leave fold ``outer`` out of every fold's training."""

    def __init__(self, evaluator, outer: int):
        self.evaluator, self.outer = evaluator, int(outer)
        self.settings = evaluator.settings
        self.objective, self.n_folds = evaluator.objective, evaluator.n_folds

    def trial(self, params: dict, name: str):
        return self.evaluator.trial(params, name, exclude=(self.outer,))


class FullEvaluator:
    """Trials of the ``full`` objective: :func:`kit.training.cv.run_cv` one fold at a time, writing
    into a scratch folder (never ``runs/<backbone>/``), removed after the trial."""

    objective = "full"

    def __init__(self, backbone: str, paths, settings: Layered, weights="auto", seed: int = 42,
                 device=None, data=None):
        folds, _ = read_folds(paths.folds_csv)
        self.n_folds = int(folds.fold.max()) + 1
        self.backbone, self.paths, self.weights, self.data = backbone, paths, weights, data
        self.seed, self.device, self.settings = seed, device, settings
        train, = patches_for(paths, native_size(backbone), splits=("train",), backbone=backbone)
        self.context = {"patch_key": train.key, "weights": str(weights)}

    def trial(self, params: dict, name: str):
        scratch = self.paths.tune_dir(self.backbone) / "trials" / name
        shutil.rmtree(scratch, ignore_errors=True)
        paths = ScratchPaths(self.paths.root, scratch)

        def run(k: int) -> FoldScore:
            with capture() as lines:  # cv's run-level lines would mislead here
                run_cv(paths, self.data, self.settings, backbone=self.backbone, seed=self.seed,
                       weights=self.weights, fold=k, params=dict(params), device=self.device)
            for line in lines:
                if line.startswith(f"{self.backbone} fold {k}:"):
                    log.info(f"  {line}")  # the fold's summary: epochs, F1, time
            df = read_oof(scratch / self.backbone / f"fold_{k}" / "oof.csv")
            y, probs = to_indices(df.label.to_numpy()), df[PROB_COLUMNS].to_numpy()
            return FoldScore(k, y, probs, macro_f1(y, probs))
        return run, lambda: shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class ScratchPaths(Paths):
    """The work directory's paths, but a backbone's cv outputs go to ``scratch``."""

    scratch: Path = Path(".")

    def backbone_dir(self, name: str) -> Path:
        return self.scratch / name


EVALUATORS = {"features": FeaturesEvaluator, "full": FullEvaluator}


def evaluate(run_fold, folds, trial=None) -> tuple[float, list[FoldScore]]:
    """Run ``folds`` in the given order, reporting each fold's macro F1 to ``trial`` (step =
    fold index) and pruning when its pruner says so; returns the pooled OOF macro F1."""
    import optuna  # a heavy import, for the trials of a study only

    scores = []
    for i, k in enumerate(folds):
        s = run_fold(k)
        scores.append(s)
        if trial is not None:
            trial.report(s.macro_f1, k)
            # After the last fold the work is done: keep the result rather than prune it.
            if i < len(folds) - 1 and trial.should_prune():
                raise optuna.TrialPruned(
                    f"fold scores {', '.join(f'{x.macro_f1:.3f}' for x in scores)} "
                    "significantly below the best trial's (Wilcoxon)")
    return pooled_f1(scores), scores

