"""``./run.sh tune``: an Optuna search of head and augmentation settings per backbone.

One study per backbone and objective, named ``<backbone>-<objective>[-<suffix>]``, in one
storage (default SQLite ``runs/optuna.db``; any RDB URL or a journal file with
``--storage``), so that a rerun continues the study and several workers share it.

Objective: the task's metric (macro F1 for AN2DL) of the pooled out-of-fold predictions at
image level, exactly as ``cv`` computes its ``oof_score``. Each fold's score is reported as an
intermediate value (step = fold index; folds visited in a per-trial shuffled order) and the
Wilcoxon signed-rank pruner compares those paired per-fold scores with the best trial's and
stops a trial once it is significantly worse. Two objectives:

- ``features``: the head trained on cached embeddings of a fully frozen backbone
  (:mod:`kit.training.features`); seconds per trial.
- ``full``: :func:`kit.training.cv.run_cv` itself, fold by fold, in a scratch folder; what cv
  trains.

Outputs in ``runs/tune/<backbone>/``: ``best.yaml`` (``params`` as dotted config keys, which
``./run.sh cv <bb> --params best`` reads, ``metric`` and ``score`` on all folds, ``trial``,
``objective``, ``study``), ``trials.csv``, ``history.png``, ``importances.png``,
``config.yaml``.

The user's training overrides (``--set train.KEY=VALUE``) apply to every trial beneath the
searched values: a key the space sets keeps each trial's value, and one line says so.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import optuna

from kit.artifacts import read_folds
from kit.config import Layered, given
from kit.metrics import get_metric
from kit.models.backbones import list_backbones
from kit.training.settings import task_salt
from kit.tuning.estimate import run_estimate
from kit.tuning.evaluators import EVALUATORS
from kit.tuning.job import TuneJob, dotted, note_searched
from kit.tuning.outputs import best_record, write_outputs
from kit.tuning.search_space import known_param_keys, load_space
from kit.tuning.storage import default_url, describe, make_storage
from kit.tuning.study import (
    SurplusTrial,
    fold_subset,
    make_objective,
    n_finished,
    open_study,
    progress_line,
    stop_when_full,
    study_name,
    wait_for_running,
    warm_start,
)
from kit.utils import KitError

log = logging.getLogger(__name__)


def run_tune(paths, data, cfg: dict, *, settings: Layered, backbones=(),
             study_suffix: str | None = None, space_file: str | Path | None = None,
             warm_start_from: str | None = None, weights="auto", seed: int = 42, device=None,
             create_only: bool = False, estimate: bool = False) -> dict:
    """Tune each backbone in turn; returns ``{backbone: best record or None}`` (with
    ``estimate``: ``{backbone: estimate.json record}``).

    Parameters
    ----------
    paths : kit.paths.Paths
    data : kit.task.Data, path or None
        The dataset, as the other stages take it: its task (None: the built-in AN2DL task)
        gives the classes and the metric every trial maximises (the full objective hands
        it to cv); a task other than the built-in one enters the study's context.
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
        the user's overrides (``--set train.KEY=VALUE``) reach every trial, beneath its
        params: a key the search space sets takes the trial's value (one line names such
        keys).
    backbones : list of str
        Default: every backbone with a cv run.
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
        ``runs/tune/<bb>/estimate.json`` (:func:`kit.tuning.estimate.nested_estimate`); the
        study and best.yaml are not touched.
    """
    return run_job(TuneJob(paths=paths, data=data, cfg=cfg, settings=settings,
                           backbones=tuple(backbones or ()), study_suffix=study_suffix,
                           space_file=space_file, warm_start_from=warm_start_from,
                           weights=weights, seed=seed, device=device,
                           create_only=create_only, estimate=estimate))


def run_job(job: TuneJob) -> dict:
    """:func:`run_tune` with its arguments as one :class:`~kit.tuning.job.TuneJob` (what a
    worker process of ``--workers/--gpus`` runs)."""
    paths, cfg = job.paths, given(job.cfg, "tune")  # checked by kit.schema at load_config
    job = replace(job, cfg=cfg)
    if not cfg["trials"] and not cfg["timeout"] and not job.create_only and not job.estimate:
        raise KitError("tune: --trials 0 and no --timeout would run forever; give one of them")
    backbones = list(job.backbones)
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
    if job.estimate:
        return {bb: run_estimate(job, bb) for bb in backbones}
    store = make_storage(cfg["storage"], paths, int(cfg["heartbeat_interval"]),
                         int(cfg["grace_period"]), cfg["max_retry"])
    url = describe(cfg["storage"] or default_url(paths))
    results = {}
    for bb in backbones:
        results[bb] = tune_backbone(job, bb, store, url)
    return results


def tune_backbone(job: TuneJob, bb: str, store, url: str) -> dict | None:
    """One backbone's study (in ``store``, described as ``url``): open, (warm-start),
    optimise, write outputs."""
    paths, cfg, seed, weights = job.paths, job.cfg, job.seed, job.weights
    suffix = job.study_suffix
    objective = cfg["objective"]
    space = load_space(bb, objective, cfg["space"], job.space_file,
                       known_param_keys(job.settings))
    note_searched(bb, space, job.settings)
    name = study_name(bb, objective, suffix)
    evaluator = EVALUATORS[objective](bb, paths, job.trial_settings(), weights=weights,
                                      seed=seed, device=job.device, data=job.data)
    task = evaluator.task
    title = get_metric(task.metric).title
    folds_df, folds_sha = read_folds(paths.folds_csv, classes=task.classes)
    n_folds = int(folds_df.fold.max()) + 1
    folds = fold_subset(n_folds, int(cfg["folds_per_trial"]), seed)
    # A task other than AN2DL's enters the context (AN2DL's studies keep theirs): a study
    # holds the scores of one metric over one set of classes.
    context = {"objective": objective, "backbone": bb, "folds_sha256": folds_sha,
               "folds": folds, "seed": int(seed), **evaluator.context, **task_salt(task)}
    study = open_study(name, store, cfg, context, seed, shared=bool(cfg["storage"]))
    n_trials = int(cfg["trials"] or 0)
    extra = {"backbone": bb, "study": name, "storage": url, "objective": objective,
             "metric": task.metric, "folds": folds,
             "tune": {k: v for k, v in cfg.items() if k != "space"},
             "train_overrides": dotted(job.settings.overrides),
             "space": space.to_dict(), "weights": str(weights), "seed": int(seed)}
    log.info(f"tune {bb}: study {name} in {url}, objective {objective} ({title}), folds "
             f"{','.join(map(str, folds))}, {n_finished(study)} finished trials so far"
             + (f", target {n_trials}" if n_trials else ""))
    if job.create_only:
        return None
    warm_start_from = job.warm_start_from
    if warm_start_from:
        src_name = (study_name(bb, "features", suffix) if warm_start_from == "features"
                    else warm_start_from)
        try:
            source = optuna.load_study(study_name=src_name, storage=store)
        except KeyError:
            raise KitError(f"--warm-start-from {warm_start_from}: no study {src_name} in {url}; "
                           f"run ./run.sh tune {bb} --objective features first") from None
        queued = warm_start(study, source, space, int(cfg["warm_start_top"]))
        log.info(f"tune {bb}: queued {queued} best trials of {src_name}")
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
                         if beats else max(0, n_trials - n_finished(study)))
        if remaining is None or remaining > 0:
            objective_fn = make_objective(evaluator, space, folds, seed, n_trials, name, beats)
            study.optimize(objective_fn, n_trials=remaining, timeout=cfg["timeout"] or None,
                           n_jobs=int(cfg["n_jobs"]), catch=(SurplusTrial,),
                           callbacks=[stop_when_full(n_trials, beats), progress_line(bb, title)],
                           gc_after_trial=True)
    except KeyboardInterrupt as exc:
        interrupted = exc  # write what is finished, then stop as the CLI expects
    log.info(f"tune {bb}: {n_finished(study)} finished trials, this run "
             f"{time.perf_counter() - t0:.0f} s")
    # After Ctrl-C, no re-scoring: best.yaml is written only if it needs no more training.
    record = best_record(study, evaluator, space, folds, seed, rescore=interrupted is None,
                         context=context)
    write_outputs(study, out, record, extra)
    if record is not None:
        log.info(f"tune {bb}: best trial {record['trial']}: search {title} "
                 f"{record['search_score']:.4f} ({record['search_score_kind']}) -> "
                 f"{out / 'best.yaml'}")
        if "holdout_score" in record:
            log.info(f"tune {bb}: {title} on all folds {record['score']:.4f}; on the "
                     f"{len(record['holdout_folds'])} folds the search did not use "
                     f"{record['holdout_score']:.4f} (less biased)")
        if evaluator.objective == "features":
            log.info(f"tune {bb}: an honest score of the tuned pipeline (nested): "
                     f"./run.sh tune {bb} --estimate")
        elif "holdout_score" not in record:
            log.info(f"tune {bb}: a less biased score: --folds-per-trial N re-scores the winner "
                     "on the folds the search did not use")
    if interrupted is not None:
        raise interrupted
    return record
