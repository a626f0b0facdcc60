"""``./run.sh tune``: an Optuna search of head and augmentation settings per backbone.

One study per backbone and objective, named ``<backbone>-<objective>[-<suffix>]``, in one
storage (default SQLite ``runs/optuna.db``; any RDB URL or a journal file with
``--storage``), so that a rerun continues the study and several workers share it.

Objective: the macro F1 of the pooled out-of-fold predictions at image level, exactly as
``cv`` computes it. Each fold's macro F1 is reported as an intermediate value (step = fold
index; folds visited in a per-trial shuffled order) and the Wilcoxon signed-rank pruner
compares those paired per-fold scores with the best trial's and stops a trial once it is
significantly worse. Two objectives:

- ``features``: the head trained on cached embeddings of a fully frozen backbone
  (:mod:`kit.training.features`); seconds per trial.
- ``full``: :func:`kit.training.cv.run_cv` itself, fold by fold, in a scratch folder; what cv
  trains.

Outputs in ``runs/tune/<backbone>/``: ``best.yaml`` (``params`` as dotted config keys, which
``./run.sh cv <bb> --params best`` reads, ``score`` on all folds, ``trial``, ``objective``,
``study``), ``trials.csv``, ``history.png``, ``importances.png``, ``config.yaml``.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kit.config import Layered, given
from kit.log import capture
from kit.metrics import bootstrap_ci, format_ci, macro_f1
from kit.tuning.search_space import Space, dotted_keys, load_space
from kit.tuning.storage import default_url, describe, make_storage
from kit.utils import (KitError, atomic_path, atomic_write_csv, check_random_state, sha256_text,
                       write_config)

log = logging.getLogger(__name__)

OBJECTIVES = ("features", "full")
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # recorded per trial: who ran it


# --------------------------------------------------------------------------- names and folds
def study_name(backbone: str, objective: str, suffix: str | None = None) -> str:
    """``<backbone>-<objective>`` plus ``-<suffix>`` when given."""
    return f"{backbone}-{objective}" + (f"-{suffix}" if suffix else "")


def fold_subset(n_folds: int, per_trial: int, seed: int) -> list[int]:
    """The folds a study evaluates: all, or ``per_trial`` of them drawn once with ``seed``.

    The subset is fixed for the whole study: trials scored on different folds would not be
    comparable (some folds are easier than others).
    """
    if not per_trial or per_trial >= n_folds:
        return list(range(n_folds))
    if per_trial < 2:
        raise KitError("--folds-per-trial must be at least 2 (the pruner compares per-fold "
                       "scores) or 0 for all folds")
    rng = check_random_state(seed)
    return sorted(int(k) for k in rng.permutation(n_folds)[:per_trial])


def trial_order(folds: list[int], seed: int, trial_number: int) -> list[int]:
    """This trial's fold order: shuffled per trial so no fold is always seen first, which
    keeps the pruner from deciding on the same easy/hard folds every time."""
    rng = np.random.default_rng([int(seed), int(trial_number)])
    return [int(folds[i]) for i in rng.permutation(len(folds))]


def known_param_keys(settings: Layered) -> set[str]:
    """Dotted keys ``cv --params`` accepts (train.yaml, augment.yaml under ``augment.``)."""
    from kit.training.settings import train_config

    return dotted_keys(train_config(settings))


# --------------------------------------------------------------------------- evaluators
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
                 device=None):
        from kit.training.fold import prepare

        self._init(prepare(backbone, paths, cfg=settings, weights=weights, seed=seed,
                           device=device, with_test=False))

    @classmethod
    def from_feature_cv(cls, fcv) -> "FeaturesEvaluator":
        """An evaluator over an already prepared :class:`kit.training.fold.FeatureCV`."""
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


class _Excluding:
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
                 device=None):
        from kit.data.folds import load_folds
        from kit.data.patches import patches_for
        from kit.models.backbones import native_size

        folds, _ = load_folds(paths)
        self.n_folds = int(folds.fold.max()) + 1
        self.backbone, self.paths, self.weights = backbone, paths, weights
        self.seed, self.device, self.settings = seed, device, settings
        train, = patches_for(paths, native_size(backbone), splits=("train",), backbone=backbone)
        self.context = {"patch_key": train.key, "weights": str(weights)}

    def trial(self, params: dict, name: str):
        from kit import PROB_COLUMNS
        from kit.training.cv import run_cv
        from kit.metrics import to_indices

        scratch = self.paths.tune_dir(self.backbone) / "trials" / name
        shutil.rmtree(scratch, ignore_errors=True)
        paths = ScratchPaths(self.paths.root, scratch)

        def run(k: int) -> FoldScore:
            import pandas as pd

            with capture() as lines:  # cv's run-level lines would mislead here
                run_cv(self.backbone, paths, cfg=self.settings, seed=self.seed,
                       weights=self.weights, fold=k, params=dict(params), device=self.device)
            for line in lines:
                if line.startswith(f"{self.backbone} fold {k}:"):
                    log.info(f"  {line}")  # the fold's summary: epochs, F1, time
            df = pd.read_csv(scratch / self.backbone / f"fold_{k}" / "oof.csv",
                             dtype={"sample_index": str, "label": str}, keep_default_na=False)
            y, probs = to_indices(df.label.to_numpy()), df[PROB_COLUMNS].to_numpy()
            return FoldScore(k, y, probs, macro_f1(y, probs))
        return run, lambda: shutil.rmtree(scratch, ignore_errors=True)


def _scratch_paths_cls():
    from kit.paths import Paths

    @dataclass(frozen=True)
    class _ScratchPaths(Paths):
        """The work directory's paths, but a backbone's cv outputs go to ``scratch``."""

        scratch: Path = Path(".")

        def backbone_dir(self, name: str) -> Path:
            return self.scratch / name
    return _ScratchPaths


def ScratchPaths(root, scratch):  # noqa: N802 (a class factory, used like a class)
    return _scratch_paths_cls()(Path(root), Path(scratch))


EVALUATORS = {"features": FeaturesEvaluator, "full": FullEvaluator}


def evaluate(run_fold, folds, trial=None) -> tuple[float, list[FoldScore]]:
    """Run ``folds`` in the given order, reporting each fold's macro F1 to ``trial`` (step =
    fold index) and pruning when its pruner says so; returns the pooled OOF macro F1."""
    import optuna

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


# --------------------------------------------------------------------------- study
def _quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def make_sampler(cfg: dict, seed: int, n_existing: int, shared: bool = False):
    """TPE seeded from ``seed`` and the trials already in the study, so a rerun neither
    replays the first run's random start-up draws nor depends on chance: one worker on the
    default storage repeats exactly. On a ``shared`` storage (``--storage``) the process id
    and host are mixed in too, so that workers starting together do not draw alike."""
    import optuna

    entropy = [int(seed), int(n_existing)]
    if shared:
        entropy += [os.getpid(), int(sha256_text(socket.gethostname())[:8], 16)]
    mix = np.random.SeedSequence(entropy).generate_state(1)[0]
    return optuna.samplers.TPESampler(seed=int(mix), n_startup_trials=int(cfg["n_startup_trials"]),
                                      constant_liar=True, multivariate=True)


def make_pruner(cfg: dict):
    import optuna

    p = cfg["pruner"]
    return optuna.pruners.WilcoxonPruner(p_threshold=float(p["p_threshold"]),
                                         n_startup_steps=int(p["n_startup_steps"]))


def open_study(name: str, storage, cfg: dict, context: dict, seed: int = 42,
               shared: bool = False):
    """Create or load study ``name`` and check it was made for the same inputs.

    ``context`` (objective, backbone, folds hash, fold subset, patch key, weights) is stored
    as the study's user attributes on creation; a later run with another context would mix
    incomparable scores in one study, so it is refused.
    """
    import optuna

    _quiet_optuna()
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                load_if_exists=True, pruner=make_pruner(cfg),
                                sampler=optuna.samplers.RandomSampler())  # replaced below
    have = study.user_attrs
    if not have.get("context"):
        study.set_user_attr("context", context)
        have = {"context": context}
    diff = sorted(k for k in context if have["context"].get(k) != context[k])
    if diff:
        raise KitError(f"study {name}: made with other {', '.join(diff)} than this run "
                       f"(e.g. {diff[0]}: {have['context'].get(diff[0])!r} vs "
                       f"{context[diff[0]]!r}); its scores are not comparable: use "
                       "--study-suffix NEW or delete it (optuna delete-study --study-name "
                       f"{name} --storage URL)")
    study.sampler = make_sampler(cfg, seed, len(study.get_trials(deepcopy=False)), shared)
    return study


def _finished(study, states=None) -> int:
    from optuna.trial import TrialState

    states = states or (TrialState.COMPLETE, TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


class SurplusTrial(Exception):
    """A worker asked for a trial after the study already had its ``--trials``."""


def _check_budget(trial, n_trials: int, count_running: bool = True) -> None:
    """Refuse trial ``trial`` when the ``n_trials`` before it (by number) already fill the
    budget: with several workers, each asks before seeing the others' new trials.
    ``count_running`` is off on storages without heartbeat, where a dead worker's trial
    stays RUNNING for ever."""
    from optuna.trial import TrialState

    if not n_trials:
        return
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING) + (
        (TrialState.RUNNING,) if count_running else ())
    before = [t for t in trial.study.get_trials(deepcopy=False, states=live)
              if t.number < trial.number]
    if len(before) >= n_trials:
        trial.set_user_attr("surplus", True)
        raise SurplusTrial(f"trial {trial.number}: the study already has its {n_trials} trials")


def make_objective(evaluator, space: Space, folds: list[int], seed: int, n_trials: int,
                   study_label: str, count_running: bool = True):
    """The Optuna objective: suggest, evaluate ``folds`` in a shuffled order, report, prune."""

    def objective(trial) -> float:
        _check_budget(trial, n_trials, count_running)
        params = space.suggest(trial)
        trial.set_user_attr("params", params)
        trial.set_user_attr("worker", WORKER)
        order = trial_order(folds, seed, trial.number)
        run_fold, cleanup = evaluator.trial(params, f"{study_label}-{trial.number}")
        t0 = time.perf_counter()
        try:
            value, scores = evaluate(run_fold, order, trial)
        finally:
            cleanup()
        trial.set_user_attr("folds", sorted(s.fold for s in scores))
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
        return value
    return objective


def _stop_when_full(n_trials: int, count_running: bool = True):
    from optuna.trial import TrialState

    def callback(study, trial):
        busy = (TrialState.COMPLETE, TrialState.PRUNED) + (
            (TrialState.RUNNING,) if count_running else ())
        if n_trials and _finished(study, busy) >= n_trials:
            study.stop()
        if trial.user_attrs.get("surplus"):
            study.stop()
    return callback


def wait_for_running(study, n_trials: int, interval: float, limit: float | None = None) -> int:
    """Before starting: while finished + running trials fill the budget, wait for the running
    ones to end. A dead worker's trial keeps RUNNING until its heartbeat is older than the
    grace period; then ``fail_stale_trials`` fails it and re-queues its parameters, which
    this worker runs next. Returns the trials still needed."""
    import optuna
    from optuna.trial import TrialState

    t0, told = time.monotonic(), False
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        done = _finished(study)
        running = _finished(study, (TrialState.RUNNING,))
        if done >= n_trials or done + running < n_trials or running == 0:
            return max(0, n_trials - done)
        if limit is not None and time.monotonic() - t0 > limit:
            return max(0, n_trials - done)
        if not told:
            log.info(f"tune: {done} finished + {running} running trial(s) fill the target of "
                     f"{n_trials}; waiting for them (a dead worker's trial is failed and "
                     "re-queued once its heartbeat is older than the grace period)")
            told = True
        time.sleep(interval)


def warm_start(study, source, space: Space, top: int) -> int:
    """Enqueue the ``top`` best complete trials of ``source`` (restricted to ``space``'s
    searched parameters, values inside their domains); returns how many were queued."""
    from optuna.trial import TrialState

    done = [t for t in source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    done.sort(key=lambda t: t.value, reverse=True)
    queued = 0
    for t in done[:top]:
        given = t.user_attrs.get("params", t.params)
        params = {k: v for k, v in given.items()
                  if k in space.searched and space.searched[k].contains(v)}
        if not params:
            continue
        study.enqueue_trial(params, user_attrs={"warm_start": f"{source.study_name}#{t.number}"},
                            skip_if_exists=True)
        queued += 1
    return queued


# --------------------------------------------------------------------------- outputs
def applies_to(objective: str, params: dict, settings: Layered) -> dict:
    """The training path and epoch selection that params tuned with ``objective`` fit:
    ``features`` trains heads on cached embeddings (cv's ``feature_cache`` path), ``full``
    trains as cv does with these params (``pixels`` unless they freeze the whole backbone)."""
    from kit.training.params import source_path
    from kit.training.settings import train_config

    cfg = train_config(settings, params)
    return {"training_path": source_path({"objective": objective}, params, settings),
            "early_stopping": str(cfg.get("early_stopping", "oof"))}


def score_kinds(n_trials: int, search_folds: list[int], n_folds: int,
                early_stopping: str) -> dict:
    """What each score of ``best.yaml`` is, in words (written beside the numbers)."""
    epochs = ("; every fold also chose its epoch on the rows it scores (early_stopping oof)"
              if early_stopping == "oof" else "")
    subset = sorted(search_folds) != list(range(n_folds))
    where = (f"folds {','.join(map(str, search_folds))}" if subset else f"all {n_folds} folds")
    kinds = {"search_score_kind": f"search: best of {n_trials} trials on {where}, the rows "
                                  f"that chose it: optimistic{epochs}"}
    if subset:
        kinds["score_kind"] = (f"the winner re-scored on all {n_folds} folds, "
                               f"{len(search_folds)} of which chose it: partly optimistic{epochs}")
        kinds["holdout_kind"] = ("the winner on the folds the search did not use: less biased "
                                 "(no trial was chosen on them), but only "
                                 f"{n_folds - len(search_folds)} folds{epochs}")
    else:
        kinds["score_kind"] = kinds["search_score_kind"]
    return kinds


def best_record(study, evaluator, space: Space, folds: list[int], seed: int,
                rescore: bool = True, context: dict | None = None) -> dict | None:
    """``best.yaml``'s contents: the best trial's params, what it was tuned for and its scores,
    each with a ``*_kind`` saying what it is.

    ``search_score`` is the best trial's value on the search folds: the best of N noisy
    trials, picked on those very rows, hence optimistic. With a fold subset
    (``--folds-per-trial``) the winner is re-scored on every fold (kept in the study for the
    next run): ``score`` on all folds, ``holdout_score`` on the folds the search never saw
    (less biased). ``None`` without a complete trial, or when a re-score is needed but
    ``rescore`` is off.
    """
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    params = dict(best.user_attrs.get("params") or {**best.params, **space.fixed})
    all_folds = list(range(evaluator.n_folds))
    search_folds = sorted(int(k) for k in folds)
    score, holdout = float(best.value), None
    per_fold = {int(k): float(v) for k, v in sorted(best.intermediate_values.items())}
    if search_folds != all_folds:
        cached = (study.user_attrs.get("rescored") or {}).get(str(best.number))
        if not isinstance(cached, dict) and rescore:  # none yet, or an older kit's bare float
            log.info(f"tune: re-scoring trial {best.number} on all {len(all_folds)} folds")
            run_fold, cleanup = evaluator.trial(params, f"{study.study_name}-best{best.number}")
            try:
                value, scores = evaluate(run_fold, all_folds)
            finally:
                cleanup()
            unused = [x for x in scores if x.fold not in search_folds]
            cached = {"score": float(value), "holdout": float(pooled_f1(unused)),
                      "per_fold": {str(x.fold): float(x.macro_f1) for x in scores}}
            rescored = dict(study.user_attrs.get("rescored") or {})
            rescored[str(best.number)] = cached
            study.set_user_attr("rescored", rescored)
        if cached is None:
            return None
        if isinstance(cached, dict):
            score, holdout = float(cached["score"]), float(cached["holdout"])
            per_fold = {int(k): float(v) for k, v in sorted(cached["per_fold"].items(),
                                                            key=lambda kv: int(kv[0]))}
        else:
            score = float(cached)
    fits = applies_to(evaluator.objective, params, evaluator.settings)
    n_trials = _finished(study)
    record = {"params": params, "objective": evaluator.objective, **fits,
              "score": score, "search_score": float(best.value), "search_folds": search_folds,
              "holdout_score": holdout,
              "holdout_folds": [k for k in all_folds if k not in search_folds] or None,
              **score_kinds(n_trials, search_folds, len(all_folds), fits["early_stopping"]),
              "trials": n_trials, "trial": int(best.number), "study": study.study_name,
              "per_fold": per_fold}
    if context:
        record.update({k: context[k] for k in ("folds_sha256", "seed") if k in context})
    return {k: v for k, v in record.items() if v is not None}


def write_outputs(study, out: Path, record: dict | None, extra: dict) -> None:
    """``trials.csv``, plots, ``best.yaml`` (when a trial completed) and ``config.yaml``."""
    out.mkdir(parents=True, exist_ok=True)
    df = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs",
                                       "intermediate_values", "datetime_start",
                                       "datetime_complete", "duration"))
    if "user_attrs_params" in df.columns:
        df = df.drop(columns=["user_attrs_params"])  # the params_ columns hold them
    atomic_write_csv(out / "trials.csv", df)
    plot_study(study, out)
    if record is not None:
        write_config(out / "best.yaml",
                     {**record, **{k: extra[k] for k in ("storage", "backbone", "weights")}})
    write_config(out / "config.yaml", extra)


def plot_study(study, out: Path) -> list[str]:
    """Optimisation history and parameter importances as PNG; skipped (with a note) while
    there are too few complete trials. Returns the notes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    notes = []
    n_done = _finished(study, (TrialState.COMPLETE,))
    plots = {"history.png": (ovm.plot_optimization_history, 1),
             "importances.png": (ovm.plot_param_importances, 2)}
    for fname, (fn, need) in plots.items():
        if n_done < need:
            notes.append(f"{fname}: needs {need} complete trials (have {n_done})")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            with atomic_path(out / fname) as tmp:
                fig.savefig(tmp, format="png", dpi=100)
            plt.close(fig)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            # e.g. importances when every complete trial has the same value
            notes.append(f"{fname}: skipped ({str(exc).splitlines()[0][:120]})")
            plt.close("all")
    for note in notes:
        log.info(f"tune: {note}")
    return notes


# --------------------------------------------------------------------------- nested estimate
ESTIMATE_KIND = ("nested: each outer fold scored by a head trained with the params of a search "
                 "that never saw it (its own search trained and scored on the other folds only)")


def nested_estimate(bb: str, paths, cfg: dict, space: Space, n_trials: int, weights="auto",
                    seed: int = 42, device=None, evaluator=None,
                    settings: Layered | None = None) -> dict:
    """An honest score of the tuned pipeline (features objective): for each outer fold ``o``,
    search ``n_trials`` trials on the other folds (each inner fold's head trained without
    ``o``), train the winner on every fold but ``o`` and score ``o``.

    The search's own best (best of N on the rows that chose it) is optimistic; here no row
    takes part in choosing the params that score it. Returns the ``estimate.json`` record:
    ``macro_f1`` (pooled over the outer folds) with ``estimate_ci95``, its 95 % bootstrap
    interval over those images (:func:`kit.metrics.bootstrap_ci`).
    """
    import optuna

    from kit.data.folds import load_folds

    _quiet_optuna()
    evaluator = evaluator or FeaturesEvaluator(bb, paths, settings, weights=weights, seed=seed,
                                               device=device)
    _, folds_sha = load_folds(paths)
    n_folds = evaluator.n_folds
    if n_folds < 3:
        raise KitError(f"tune --estimate needs at least 3 folds (an outer fold and 2 inner "
                       f"ones for the pruner's paired scores); {paths.folds_csv} has {n_folds}")
    t_all = time.perf_counter()
    outer, preds = [], []
    for o in range(n_folds):
        t0 = time.perf_counter()
        inner = [k for k in range(n_folds) if k != o]
        entropy = np.random.SeedSequence([int(seed), 0xE57, o]).generate_state(1)[0]
        study = optuna.create_study(
            direction="maximize", pruner=make_pruner(cfg),
            sampler=optuna.samplers.TPESampler(
                seed=int(entropy), n_startup_trials=int(cfg["n_startup_trials"]),
                multivariate=True))
        label = f"{bb}-estimate-outer{o}"
        study.optimize(make_objective(_Excluding(evaluator, o), space, inner, seed, n_trials,
                                      label), n_trials=n_trials, catch=(SurplusTrial,),
                       gc_after_trial=True)
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not done:
            raise KitError(f"tune --estimate: no trial of outer fold {o} completed; raise "
                           "--estimate-trials")
        best = study.best_trial
        params = dict(best.user_attrs.get("params") or {**best.params, **space.fixed})
        # The winner trains on every inner fold (all but o) and predicts o: cv's fold o.
        pred = evaluator.fcv.configure(params).fold(o)
        preds.append(pred)
        mode = str(evaluator.fcv.configure(params).cfg.get("early_stopping", "oof"))
        outer.append({"fold": o, "inner_folds": inner, "n": int(len(pred.y)),
                      "early_stopping": mode,
                      "macro_f1": float(pred.macro_f1), "search_score": float(best.value),
                      "trial": int(best.number), "trials": _finished(study),
                      "params": params, "seconds": round(time.perf_counter() - t0, 2)})
        log.info(f"tune {bb} --estimate: outer fold {o}: search on folds "
                 f"{','.join(map(str, inner))} best {best.value:.4f} (trial {best.number} of "
                 f"{_finished(study)}), outer fold macro F1 {pred.macro_f1:.4f}")
    y = np.concatenate([p.y for p in preds])
    probs = np.concatenate([p.probs for p in preds])
    fold_scores = [r["macro_f1"] for r in outer]
    modes = sorted({r["early_stopping"] for r in outer})
    mode = modes[0] if len(modes) == 1 else ",".join(modes)
    honest = "oof" not in modes
    return {
        "backbone": bb, "objective": "features", "kind": ESTIMATE_KIND,
        "macro_f1": float(macro_f1(y, probs)),
        # one draw of images, hence its interval (about +-0.035 on 581 images)
        "estimate_ci95": list(bootstrap_ci(y, probs)), "n_images": int(len(y)),
        "mean_fold_macro_f1": float(np.mean(fold_scores)),
        "std_fold_macro_f1": float(np.std(fold_scores)),
        "honest": honest,
        "why": ("no outer fold took part in choosing its params" + (
            "" if honest else "; but each fold chose its epoch on the rows it scores "
            "(early_stopping oof): optimistic")),
        "early_stopping": mode, "trials_per_outer_fold": int(n_trials),
        "n_folds": n_folds, "folds_sha256": folds_sha, "seed": int(seed),
        "weights": str(weights), "space": space.to_dict(), "outer": outer,
        "seconds": round(time.perf_counter() - t_all, 2),
    }


def run_estimate(bb: str, paths, cfg: dict, settings: Layered, space_file, weights, seed: int,
                 device, n_trials: int) -> dict:
    """``tune --estimate`` for one backbone: :func:`nested_estimate`, written to
    ``runs/tune/<bb>/estimate.json`` and printed beside best.yaml's search score."""
    from datetime import datetime, timezone

    from kit.utils import atomic_write_json, read_yaml

    if cfg["objective"] != "features":
        raise KitError(
            f"tune --estimate supports the features objective only: a nested search with "
            f"--objective {cfg['objective']} trains every fold's model once per trial and per "
            "outer fold (outer folds x trials x inner folds trainings, hours each on a CPU); "
            f"estimate the head search with ./run.sh tune {bb} --estimate, and judge a full "
            "search by the holdout_score that --folds-per-trial N writes into best.yaml")
    if n_trials < 1:
        raise KitError(f"--estimate-trials must be >= 1 (got {n_trials})")
    space = load_space(bb, "features", cfg["space"], space_file, known_param_keys(settings))
    log.info(f"tune {bb} --estimate: nested, {n_trials} trials per outer fold (the study and "
             "best.yaml are not touched)")
    record = nested_estimate(bb, paths, cfg, space, n_trials, weights, seed, device,
                             settings=settings)
    best = paths.tune_dir(bb) / "best.yaml"
    if best.is_file():
        found = read_yaml(best)
        if found.get("objective", "features") == "features" and "search_score" in found:
            record["search_score"] = float(found["search_score"])
            record["search_score_kind"] = found.get("search_score_kind", "search (optimistic)")
            record["search_trials"] = found.get("trials")
    out = paths.tune_dir(bb) / "estimate.json"
    record["created_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(out, record)
    per_fold = ", ".join(f"{r['macro_f1']:.3f}" for r in record["outer"])
    log.info(f"tune {bb} --estimate: nested macro F1 estimate "
             f"{format_ci(record['macro_f1'], record['estimate_ci95'])} (95% bootstrap interval "
             f"over {record['n_images']} images; pooled over {record['n_folds']} outer folds; per "
             f"fold {per_fold}), {record['seconds']:.0f} s -> {out}")
    if "search_score" in record:
        log.info(f"tune {bb} --estimate: best.yaml's search score {record['search_score']:.4f} is "
                 f"the best of {record.get('search_trials') or 'N'} trials on the rows that chose "
                 f"it: {record['search_score'] - record['macro_f1']:+.4f} above the estimate")
    if not record["honest"]:
        log.info(f"tune {bb} --estimate: {record['why']}")
    return record


# --------------------------------------------------------------------------- stage
def run_tune(backbones, paths, cfg: dict, settings: Layered, study_suffix: str | None = None,
             space_file: str | Path | None = None, warm_start_from: str | None = None,
             weights="auto", seed: int = 42, device=None, create_only: bool = False,
             estimate: bool = False) -> dict:
    """Tune each backbone in turn; returns ``{backbone: best record or None}`` (with
    ``estimate``: ``{backbone: estimate.json record}``).

    Parameters
    ----------
    backbones : list of str
    paths : kit.paths.Paths
    cfg : dict
        The resolved ``tune`` config (``kit.config.load_config("tune", overrides)``), among
        others: ``objective`` (features | full); ``trials``, the study's target of finished
        (complete or pruned) trials, shared by every worker and every rerun, 0 = no bound;
        ``timeout``, seconds this run keeps starting trials, 0 = no limit; ``storage``, empty
        = ``sqlite:///<workdir>/runs/optuna.db``, an RDB URL, or ``journal:PATH`` / *.log;
        ``folds_per_trial``, folds per trial during the search (0 = all; the best is
        re-scored on all folds); ``n_jobs``; ``heartbeat_interval`` / ``grace_period``
        (seconds, RDB storages); ``estimate_trials``, each outer fold's trials with
        ``estimate``.
    settings : kit.config.Layered
        The training settings the trials start from (:func:`kit.config.train_settings`):
        each trial's params go over their defaults, the overrides over the params.
    study_suffix : str
        Appended to the study name (``<bb>-<objective>-<suffix>``).
    space_file : path
        YAML merged over ``kit/conf/tune.yaml``'s ``space``.
    warm_start_from : str
        ``features`` (the features study of the same backbone and suffix) or a study name:
        its best trials are enqueued first.
    create_only : bool
        Create (or check) the studies and stop: run this once before starting many workers
        on an empty RDB, where workers would otherwise race to create Optuna's tables.
    estimate : bool
        Instead of the search: a nested estimate of the tuned pipeline (features objective),
        ``runs/tune/<bb>/estimate.json`` (:func:`nested_estimate`); the study and best.yaml
        are not touched.
    """
    cfg = given(cfg, "tune")
    if cfg["objective"] not in OBJECTIVES:
        raise KitError(f"--objective must be one of {', '.join(OBJECTIVES)} "
                       f"(got {cfg['objective']!r})")
    if not cfg["trials"] and not cfg["timeout"] and not create_only and not estimate:
        raise KitError("tune: --trials 0 and no --timeout would run forever; give one of them")
    from kit.models.backbones import list_backbones

    if not backbones:
        backbones = [b for b in list_backbones()
                     if (paths.backbone_dir(b) / "metrics.json").exists()]
        if not backbones:
            raise KitError("tune: name the backbones to tune (e.g. ./run.sh tune efficientnet_b0);"
                           f" without names it tunes those cv has run, and {paths.runs_dir} has "
                           "none")
        log.info(f"tune: backbones with a cv run: {', '.join(backbones)}")

    unknown = [b for b in backbones if b not in list_backbones()]
    if unknown:
        raise KitError(f"unknown backbone(s) {', '.join(unknown)}; known backbones: "
                       f"{', '.join(list_backbones())}")
    if estimate:
        return {bb: run_estimate(bb, paths, cfg, settings, space_file, weights, seed, device,
                                 int(cfg["estimate_trials"])) for bb in backbones}
    store = make_storage(cfg["storage"], paths, int(cfg["heartbeat_interval"]),
                         int(cfg["grace_period"]), cfg["max_retry"])
    url = describe(cfg["storage"] or default_url(paths))
    results = {}
    for bb in backbones:
        results[bb] = tune_backbone(bb, paths, cfg, settings, store, url, study_suffix,
                                    space_file, warm_start_from, weights, seed, device,
                                    create_only)
    return results


def tune_backbone(bb: str, paths, cfg: dict, settings: Layered, store, url: str, suffix,
                  space_file, warm_start_from, weights, seed: int, device,
                  create_only: bool) -> dict | None:
    """One backbone's study: open, (warm-start), optimise, write outputs."""
    import optuna

    from kit.data.folds import load_folds

    objective = cfg["objective"]
    space = load_space(bb, objective, cfg["space"], space_file, known_param_keys(settings))
    folds_df, folds_sha = load_folds(paths)
    n_folds = int(folds_df.fold.max()) + 1
    folds = fold_subset(n_folds, int(cfg["folds_per_trial"] or 0), seed)
    name = study_name(bb, objective, suffix)
    evaluator = EVALUATORS[objective](bb, paths, settings, weights=weights, seed=seed,
                                      device=device)
    context = {"objective": objective, "backbone": bb, "folds_sha256": folds_sha,
               "folds": folds, "seed": int(seed), **evaluator.context}
    study = open_study(name, store, cfg, context, seed, shared=bool(cfg["storage"]))
    n_trials = int(cfg["trials"] or 0)
    extra = {"backbone": bb, "study": name, "storage": url, "objective": objective,
             "folds": folds, "tune": {k: v for k, v in cfg.items() if k != "space"},
             "space": space.to_dict(), "weights": str(weights), "seed": int(seed)}
    log.info(f"tune {bb}: study {name} in {url}, objective {objective}, folds "
             f"{','.join(map(str, folds))}, {_finished(study)} finished trials so far"
             + (f", target {n_trials}" if n_trials else ""))
    if create_only:
        return None
    if warm_start_from:
        src_name = (study_name(bb, "features", suffix) if warm_start_from == "features"
                    else warm_start_from)
        try:
            source = optuna.load_study(study_name=src_name, storage=store)
        except KeyError:
            raise KitError(f"--warm-start-from {warm_start_from}: no study {src_name} in {url}; "
                           f"run ./run.sh tune {bb} --objective features first")
        log.info(f"tune {bb}: queued {warm_start(study, source, space, int(cfg['warm_start_top']))} "
                 f"best trials of {src_name}")
    out = paths.tune_dir(bb)
    # Journal files have no heartbeat: a RUNNING trial there may belong to a dead worker.
    beats = getattr(store, "get_heartbeat_interval", lambda: None)() is not None
    interrupted = None
    t0 = time.perf_counter()
    try:
        remaining = None
        if n_trials:
            remaining = (wait_for_running(study, n_trials, float(cfg["heartbeat_interval"]),
                                          cfg["timeout"] or None)
                         if beats else max(0, n_trials - _finished(study)))
        if remaining is None or remaining > 0:
            objective_fn = make_objective(evaluator, space, folds, seed, n_trials, name, beats)
            study.optimize(objective_fn, n_trials=remaining, timeout=cfg["timeout"] or None,
                           n_jobs=int(cfg["n_jobs"]), catch=(SurplusTrial,),
                           callbacks=[_stop_when_full(n_trials, beats), _progress_line(bb)],
                           gc_after_trial=True)
    except KeyboardInterrupt as exc:
        interrupted = exc  # write what is finished, then stop as the CLI expects
    log.info(f"tune {bb}: {_finished(study)} finished trials, this run "
             f"{time.perf_counter() - t0:.0f} s")
    # After Ctrl-C, no re-scoring: best.yaml is written only if it needs no more training.
    record = best_record(study, evaluator, space, folds, seed, rescore=interrupted is None,
                         context=context)
    write_outputs(study, out, record, extra)
    if record is not None:
        log.info(f"tune {bb}: best trial {record['trial']}: search score {record['search_score']:.4f}"
                 f" ({record['search_score_kind']}) -> {out / 'best.yaml'}")
        if "holdout_score" in record:
            log.info(f"tune {bb}: on all folds {record['score']:.4f}; on the {len(record['holdout_folds'])}"
                     f" folds the search did not use {record['holdout_score']:.4f} (less biased)")
        if evaluator.objective == "features":
            log.info(f"tune {bb}: an honest score of the tuned pipeline (nested): "
                     f"./run.sh tune {bb} --estimate")
        elif "holdout_score" not in record:
            log.info(f"tune {bb}: a less biased score: --folds-per-trial N re-scores the winner "
                     "on the folds the search did not use")
    if interrupted is not None:
        raise interrupted
    return record


def _progress_line(bb: str):
    from optuna.trial import TrialState

    def callback(study, trial):
        if trial.state == TrialState.COMPLETE:
            what = f"macro F1 {trial.value:.4f}"
        elif trial.state == TrialState.PRUNED:
            steps = trial.intermediate_values
            what = f"pruned after {len(steps)} folds"
        else:
            what = trial.state.name.lower()
        try:
            best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:
            best = "no complete trial yet"
        log.info(f"tune {bb}: trial {trial.number} {what}; {best}")
    return callback
