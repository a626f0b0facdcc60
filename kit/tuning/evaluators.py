"""The two ways a tune trial scores its params, fold by fold: heads on one embedding cache
(``features``) or cv itself in a scratch folder (``full``); the score is the task's metric."""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kit.artifacts import read_folds, read_oof
from kit.config import Layered
from kit.data.patches import patches_for
from kit.log import capture
from kit.metrics import score, to_indices
from kit.models.backbones import native_size
from kit.paths import Paths
from kit.task import Task, default_task, task_of
from kit.training.cv import run_cv
from kit.training.feature_cv import prepare

log = logging.getLogger(__name__)


@dataclass
class FoldScore:
    """One fold's image-level OOF predictions (class indices, probabilities) and their score
    by the task's metric."""

    fold: int
    y: np.ndarray
    probs: np.ndarray
    score: float


def pooled_score(scores, task: Task | None = None) -> float:
    """The task's metric (default: the built-in task's) of the pooled OOF predictions (image
    level): cv's ``oof_score``."""
    task = default_task() if task is None else task
    scores = list(scores)
    return score(task.metric, np.concatenate([s.y for s in scores]),
                 np.concatenate([s.probs for s in scores]), task.classes)


class FeaturesEvaluator:
    """Trials of the ``features`` objective: one embedding cache, a head per fold and trial.

    ``data`` (a :class:`kit.task.Data`, a dataset root or None: the built-in task) gives the
    task, whose classes the heads predict and whose metric scores them.
    """

    objective = "features"

    def __init__(self, backbone: str, paths, settings: Layered, weights="auto", seed: int = 42,
                 device=None, data=None):
        self._init(prepare(backbone, paths, settings=settings, weights=weights, seed=seed,
                           device=device, with_test=False, task=task_of(data)))

    @classmethod
    def from_feature_cv(cls, fcv) -> "FeaturesEvaluator":
        """An evaluator over an already prepared :class:`kit.training.feature_cv.FeatureCV`."""
        self = cls.__new__(cls)
        self._init(fcv)
        return self

    def _init(self, fcv) -> None:
        self.fcv, self.n_folds, self.last_fit = fcv, fcv.n_folds, None
        self.settings, self.task = fcv.settings, fcv.task
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
            return FoldScore(k, p.y, p.probs, p.score)
        return run, lambda: None


class Excluding:
    """An evaluator whose trials leave fold ``outer`` out of every fold's training."""

    def __init__(self, evaluator, outer: int):
        self.evaluator, self.outer = evaluator, int(outer)
        self.settings, self.task = evaluator.settings, evaluator.task
        self.objective, self.n_folds = evaluator.objective, evaluator.n_folds

    def trial(self, params: dict, name: str):
        return self.evaluator.trial(params, name, exclude=(self.outer,))


class FullEvaluator:
    """Trials of the ``full`` objective: :func:`kit.training.cv.run_cv` one fold at a time, writing
    into a scratch folder (never ``runs/<backbone>/``), removed after the trial."""

    objective = "full"

    def __init__(self, backbone: str, paths, settings: Layered, weights="auto", seed: int = 42,
                 device=None, data=None):
        self.task = task_of(data)
        folds, _ = read_folds(paths.folds_csv, classes=self.task.classes)
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
                    log.info(f"  {line}")  # the fold's summary: epochs, score, time
            task = self.task
            df = read_oof(scratch / self.backbone / f"fold_{k}" / "oof.csv", classes=task.classes)
            y = to_indices(df.label.to_numpy(), task.classes)
            probs = df[task.prob_columns].to_numpy()
            return FoldScore(k, y, probs, score(task.metric, y, probs, task.classes))
        return run, lambda: shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class ScratchPaths(Paths):
    """The work directory's paths, but a backbone's cv outputs go to ``scratch``."""

    scratch: Path = Path(".")

    def backbone_dir(self, name: str) -> Path:
        return self.scratch / name


EVALUATORS = {"features": FeaturesEvaluator, "full": FullEvaluator}


def evaluate(run_fold, folds, trial=None, task: Task | None = None
             ) -> tuple[float, list[FoldScore]]:
    """Run ``folds`` in the given order, reporting each fold's score (the task's metric) to
    ``trial`` (step = fold index) and pruning when its pruner says so; returns the pooled OOF
    score (:func:`pooled_score`) and the folds' scores."""
    import optuna  # a heavy import, for the trials of a study only

    scores = []
    for i, k in enumerate(folds):
        s = run_fold(k)
        scores.append(s)
        if trial is not None:
            trial.report(s.score, k)
            # After the last fold the work is done: keep the result rather than prune it.
            if i < len(folds) - 1 and trial.should_prune():
                raise optuna.TrialPruned(
                    f"fold scores {', '.join(f'{x.score:.3f}' for x in scores)} "
                    "significantly below the best trial's (Wilcoxon)")
    return pooled_score(scores, task), scores

