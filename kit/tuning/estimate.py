"""``tune --estimate``: an honest (nested) score of the tuned pipeline, features objective:
each outer fold scored by the winner of a search that never saw it."""
from __future__ import annotations

import logging
import time
from datetime import datetime, timezone

import numpy as np
import optuna

from kit.artifacts import read_folds
from kit.config import Layered
from kit.metrics import bootstrap_ci, format_ci, get_metric, macro_f1, score
from kit.tuning.evaluators import Excluding, FeaturesEvaluator
from kit.tuning.job import TuneJob, note_searched
from kit.tuning.search_space import Space, known_param_keys, load_space
from kit.tuning.study import SurplusTrial, make_objective, make_pruner, n_finished, quiet_optuna
from kit.utils import KitError, atomic_write_json, read_yaml

log = logging.getLogger(__name__)


ESTIMATE_KIND = ("nested: each outer fold scored by a head trained with the params of a search "
                 "that never saw it (its own search trained and scored on the other folds only)")


def nested_estimate(bb: str, paths, cfg: dict, space: Space, n_trials: int, weights="auto",
                    seed: int = 42, device=None, evaluator=None,
                    settings: Layered | None = None, data=None) -> dict:
    """An honest score of the tuned pipeline (features objective): for each outer fold ``o``,
    search ``n_trials`` trials on the other folds (each inner fold's head trained without
    ``o``), train the winner on every fold but ``o`` and score ``o``.

    The inner folds are the folds of ``folds/folds.csv``, so each group (a patient, shared
    masks) stays within one of them, as it does in cv. The search's own best (best of N on
    the rows that chose it) is optimistic; here no row takes part in choosing the params that
    score it. Returns the ``estimate.json`` record: ``metric`` (the task's, ``data``'s;
    None: the built-in task) and ``score`` (pooled over the outer folds) with
    ``estimate_ci95``, its 95 % bootstrap interval over those images
    (:func:`kit.metrics.bootstrap_ci`); ``macro_f1`` beside it.
    """
    quiet_optuna()
    evaluator = evaluator or FeaturesEvaluator(bb, paths, settings, weights=weights, seed=seed,
                                               device=device, data=data)
    task = evaluator.task
    title = get_metric(task.metric).title
    _, folds_sha = read_folds(paths.folds_csv, classes=task.classes)
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
        study.optimize(make_objective(Excluding(evaluator, o), space, inner, seed, n_trials,
                                      label), n_trials=n_trials, catch=(SurplusTrial,),
                       gc_after_trial=True)
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not done:
            raise KitError(f"tune --estimate: no trial of outer fold {o} completed; raise "
                           "--estimate-trials")
        best = study.best_trial
        params = dict(best.user_attrs.get("params") or {**best.params, **space.fixed})
        # The winner trains on every inner fold (all but o) and predicts o: cv's fold o.
        winner = evaluator.fcv.configure(params)
        pred = winner.fold(o)
        preds.append(pred)
        mode = str(winner.cfg["early_stopping"])
        outer.append({"fold": o, "inner_folds": inner, "n": int(len(pred.y)),
                      "early_stopping": mode, "score": float(pred.score),
                      "macro_f1": float(pred.macro_f1), "search_score": float(best.value),
                      "trial": int(best.number), "trials": n_finished(study),
                      "params": params, "seconds": round(time.perf_counter() - t0, 2)})
        log.info(f"tune {bb} --estimate: outer fold {o}: search on folds "
                 f"{','.join(map(str, inner))} best {best.value:.4f} (trial {best.number} of "
                 f"{n_finished(study)}), outer fold {title} {pred.score:.4f}")
    y = np.concatenate([p.y for p in preds])
    probs = np.concatenate([p.probs for p in preds])
    fold_scores = [r["score"] for r in outer]
    fold_f1 = [r["macro_f1"] for r in outer]
    modes = sorted({r["early_stopping"] for r in outer})
    mode = modes[0] if len(modes) == 1 else ",".join(modes)
    honest = "oof" not in modes
    return {
        "backbone": bb, "objective": "features", "kind": ESTIMATE_KIND,
        "metric": task.metric, "score": score(task.metric, y, probs, task.classes),
        "macro_f1": float(macro_f1(y, probs)),
        # The score's interval over one draw of images (about +-0.035 on 581 images).
        "estimate_ci95": list(bootstrap_ci(y, probs, metric=task.metric, classes=task.classes)),
        "n_images": int(len(y)),
        "mean_fold_score": float(np.mean(fold_scores)),
        "std_fold_score": float(np.std(fold_scores)),
        "mean_fold_macro_f1": float(np.mean(fold_f1)),
        "std_fold_macro_f1": float(np.std(fold_f1)),
        "honest": honest,
        "why": ("no outer fold took part in choosing its params" + (
            "" if honest else "; but each fold chose its epoch on the rows it scores "
            "(early_stopping oof): optimistic")),
        "early_stopping": mode, "trials_per_outer_fold": int(n_trials),
        "n_folds": n_folds, "folds_sha256": folds_sha, "seed": int(seed),
        "weights": str(weights), "space": space.to_dict(), "outer": outer,
        "seconds": round(time.perf_counter() - t_all, 2),
    }


def run_estimate(job: TuneJob, bb: str) -> dict:
    """``tune --estimate`` for one backbone: :func:`nested_estimate`, written to
    ``runs/tune/<bb>/estimate.json`` and printed beside best.yaml's search score."""
    paths, cfg, settings = job.paths, job.cfg, job.trial_settings()
    n_trials = int(cfg["estimate_trials"])
    if cfg["objective"] != "features":
        raise KitError(
            f"tune --estimate supports the features objective only: a nested search with "
            f"--objective {cfg['objective']} trains every fold's model once per trial and per "
            "outer fold (outer folds x trials x inner folds trainings, hours each on a CPU); "
            f"estimate the head search with ./run.sh tune {bb} --estimate, and judge a full "
            "search by the holdout_score that --folds-per-trial N writes into best.yaml")
    if n_trials < 1:
        raise KitError(f"--estimate-trials must be >= 1 (got {n_trials})")
    space = load_space(bb, "features", cfg["space"], job.space_file, known_param_keys(settings))
    note_searched(bb, space, job.settings)
    log.info(f"tune {bb} --estimate: nested, {n_trials} trials per outer fold (the study and "
             "best.yaml are not touched)")
    record = nested_estimate(bb, paths, cfg, space, n_trials, job.weights, job.seed, job.device,
                             settings=settings, data=job.data)
    title = get_metric(record["metric"]).title
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
    per_fold = ", ".join(f"{r['score']:.3f}" for r in record["outer"])
    log.info(f"tune {bb} --estimate: nested {title} estimate "
             f"{format_ci(record['score'], record['estimate_ci95'])} (95% bootstrap interval "
             f"over {record['n_images']} images; pooled over {record['n_folds']} outer folds; per "
             f"fold {per_fold}), {record['seconds']:.0f} s -> {out}")
    if "search_score" in record:
        log.info(f"tune {bb} --estimate: best.yaml's search score {record['search_score']:.4f} is "
                 f"the best of {record.get('search_trials') or 'N'} trials on the rows that chose "
                 f"it: {record['search_score'] - record['score']:+.4f} above the estimate")
    if not record["honest"]:
        log.info(f"tune {bb} --estimate: {record['why']}")
    return record

