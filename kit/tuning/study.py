"""One Optuna study per backbone and objective: its name and folds, sampler and pruner, the
objective each trial runs, the trial budget shared by every worker, warm starts."""
from __future__ import annotations

import logging
import os
import socket
import time
import warnings

import numpy as np
import optuna
from optuna.trial import TrialState

from kit.tuning.evaluators import evaluate
from kit.tuning.search_space import Space
from kit.utils import KitError, check_random_state, sha256_text

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- study
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def make_sampler(cfg: dict, seed: int, n_existing: int, shared: bool = False):
    """TPE seeded from ``seed`` and the trials already in the study, so a rerun neither
    replays the first run's random start-up draws nor depends on chance: one worker on the
    default storage repeats exactly. On a ``shared`` storage (``--storage``) the process id
    and host are mixed in too, so that workers starting together do not draw alike."""
    entropy = [int(seed), int(n_existing)]
    if shared:
        entropy += [os.getpid(), int(sha256_text(socket.gethostname())[:8], 16)]
    mix = np.random.SeedSequence(entropy).generate_state(1)[0]
    return optuna.samplers.TPESampler(seed=int(mix), n_startup_trials=int(cfg["n_startup_trials"]),
                                      constant_liar=True, multivariate=True)


def make_pruner(cfg: dict):
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
    quiet_optuna()
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


def n_finished(study, states=None) -> int:
    states = states or (TrialState.COMPLETE, TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


class SurplusTrial(Exception):
    """A worker asked for a trial after the study already had its ``--trials``."""


def _check_budget(trial, n_trials: int, count_running: bool = True) -> None:
    """Refuse trial ``trial`` when the ``n_trials`` before it (by number) already fill the
    budget: with several workers, each asks before seeing the others' new trials.
    ``count_running`` is off on storages without heartbeat, where a dead worker's trial
    stays RUNNING for ever."""
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
    """The Optuna objective: suggest, evaluate ``folds`` in a shuffled order, report, prune;
    its value is the pooled OOF score by the task's metric (``evaluator.task``), maximised."""

    def objective(trial) -> float:
        _check_budget(trial, n_trials, count_running)
        params = space.suggest(trial)
        trial.set_user_attr("params", params)
        trial.set_user_attr("worker", WORKER)
        order = trial_order(folds, seed, trial.number)
        run_fold, cleanup = evaluator.trial(params, f"{study_label}-{trial.number}")
        t0 = time.perf_counter()
        try:
            value, scores = evaluate(run_fold, order, trial, evaluator.task)
        finally:
            cleanup()
        trial.set_user_attr("folds", sorted(s.fold for s in scores))
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
        return value
    return objective


def stop_when_full(n_trials: int, count_running: bool = True):
    def callback(study, trial):
        busy = (TrialState.COMPLETE, TrialState.PRUNED) + (
            (TrialState.RUNNING,) if count_running else ())
        if n_trials and n_finished(study, busy) >= n_trials:
            study.stop()
        if trial.user_attrs.get("surplus"):
            study.stop()
    return callback


def wait_for_running(study, n_trials: int, interval: float, limit: float | None = None) -> int:
    """Before starting: while finished + running trials fill the budget, wait for the running
    ones to end. A dead worker's trial keeps RUNNING until its heartbeat is older than the
    grace period; then ``fail_stale_trials`` fails it and re-queues its parameters, which
    this worker runs next. Returns the trials still needed."""
    t0, told = time.monotonic(), False
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        done = n_finished(study)
        running = n_finished(study, (TrialState.RUNNING,))
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



def progress_line(bb: str, title: str = "macro F1"):
    """The line each finished trial prints, its value named by ``title`` (the metric's)."""
    def callback(study, trial):
        if trial.state == TrialState.COMPLETE:
            what = f"{title} {trial.value:.4f}"
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

