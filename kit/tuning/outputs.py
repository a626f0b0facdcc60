"""What a study leaves in ``runs/tune/<backbone>/``: ``best.yaml`` (the winner's params and
its scores, each saying what it is), ``trials.csv``, the plots and ``config.yaml``."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

from optuna.trial import TrialState

from kit.config import Layered
from kit.training.params import source_path
from kit.training.settings import train_config
from kit.tuning.evaluators import evaluate, pooled_score
from kit.tuning.search_space import Space
from kit.tuning.study import n_finished
from kit.utils import atomic_path, atomic_write_csv, write_config

log = logging.getLogger(__name__)


def applies_to(objective: str, params: dict, settings: Layered) -> dict:
    """The training path and epoch selection that params tuned with ``objective`` fit:
    ``features`` trains heads on cached embeddings (cv's ``feature_cache`` path), ``full``
    trains as cv does with these params (``pixels`` unless they freeze the whole backbone)."""
    cfg = train_config(settings, params)
    return {"training_path": source_path({"objective": objective}, params, settings),
            "early_stopping": str(cfg["early_stopping"])}


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

    Every score is the task's metric (``metric``, ``evaluator.task``'s). ``search_score`` is
    the best trial's value on the search folds: the best of N noisy trials, picked on those
    very rows, hence optimistic. With a fold subset
    (``--folds-per-trial``) the winner is re-scored on every fold (kept in the study for the
    next run): ``score`` on all folds, ``holdout_score`` on the folds the search never saw
    (less biased). ``None`` without a complete trial, or when a re-score is needed but
    ``rescore`` is off.
    """
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
                value, scores = evaluate(run_fold, all_folds, task=evaluator.task)
            finally:
                cleanup()
            unused = [x for x in scores if x.fold not in search_folds]
            cached = {"score": float(value),
                      "holdout": float(pooled_score(unused, evaluator.task)),
                      "per_fold": {str(x.fold): float(x.score) for x in scores}}
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
    n_trials = n_finished(study)
    record = {"params": params, "objective": evaluator.objective, **fits,
              "metric": evaluator.task.metric,
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
        # The train settings the trials ran with, when the user gave any: cv applies them
        # only when given to it as well (they are settings of the search, not tuned values).
        given = {"train_overrides": extra["train_overrides"]} if extra["train_overrides"] \
            else {}
        write_config(out / "best.yaml",
                     {**record, **{k: extra[k] for k in ("storage", "backbone", "weights")},
                      **given})
    write_config(out / "config.yaml", extra)


def plot_study(study, out: Path) -> list[str]:
    """Optimisation history and parameter importances as PNG; skipped (with a note) while
    there are too few complete trials. Returns the notes."""
    import matplotlib  # heavy, and only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    notes = []
    n_done = n_finished(study, (TrialState.COMPLETE,))
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

