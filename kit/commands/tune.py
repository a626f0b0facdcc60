"""``./run.sh tune``: Optuna search of head and augmentation settings per backbone.

Start the same command on several machines with the same ``--storage`` and they share the
study; rerunning it continues where it stopped. See docs/tuning.md.
"""
from __future__ import annotations

# The --config/--set keys under `train` are cv's training settings (train.yaml), the rest
# tune.yaml's; shown at the end of ./run.sh tune --help.
EPILOG = ("--set and --config take tune.yaml's keys (e.g. --set pruner.p_threshold=0.05), and "
          "cv's training settings under train. (e.g. --set train.epochs=20 --set "
          "train.features.batch_size=64, or a train: mapping in the --config file): those "
          "reach every trial, beneath the searched values (a key the search space sets keeps "
          "each trial's value; a line names such keys), checked before any work. cv applies "
          "them only when given to cv too. Every trial maximises the task's metric "
          "(task.yaml's metric; macro F1 for AN2DL).")


def add_arguments(parser):
    from kit.models.backbones import describe_backbones  # the registry: every backbone

    parser.epilog = EPILOG

    parser.add_argument("backbones", nargs="*", metavar="BACKBONE",
                        help="backbones to tune, one study each: " + "; ".join(
                            describe_backbones(notes=False)))
    parser.add_argument("--objective", choices=("features", "full"),
                        help="features: head on cached frozen embeddings (seconds per trial); "
                             "full: trains as cv does (default: kit/conf/tune.yaml, features)")
    parser.add_argument("--trials", type=int,
                        help="stop when the study holds this many finished trials, counting "
                             "every worker and earlier runs; 0 = no bound (default: 30)")
    parser.add_argument("--timeout", type=float,
                        help="seconds this run keeps starting trials; 0 = no limit")
    parser.add_argument("--storage",
                        help="Optuna storage shared by the workers: an RDB URL "
                             "(postgresql+psycopg2://user:pw@host:5432/db, mysql+pymysql://..., "
                             "sqlite:///path) or a journal file (journal:PATH or PATH.log); "
                             "default: sqlite runs/optuna.db")
    parser.add_argument("--study-suffix", help="study name <backbone>-<objective>-<suffix>")
    parser.add_argument("--folds-per-trial", type=int,
                        help="evaluate this many folds (fixed per study) per trial; the best is "
                             "re-scored on all folds, and on the folds the search did not use "
                             "(best.yaml holdout_score, less biased) (default: 0 = all)")
    parser.add_argument("--estimate", action="store_true",
                        help="instead of the search: an honest (nested) score of the tuned "
                             "pipeline, features objective: per outer fold, a search on the "
                             "other folds, then the winner scored on the outer fold -> "
                             "runs/tune/<bb>/estimate.json, with its 95%% bootstrap interval "
                             "(the study and best.yaml are not touched). It costs about 1.3x "
                             "the search itself at the defaults (K outer folds x "
                             "--estimate-trials x K-1 inner folds head fits: 5 x 10 x 4 against "
                             "30 trials x 5 folds); lower --estimate-trials to make it cheaper")
    parser.add_argument("--estimate-trials", type=int, metavar="N",
                        help="trials of each outer fold's search with --estimate; any N >= 1, "
                             "e.g. 2 for a quick estimate of a short search (default: tune.yaml "
                             "estimate_trials, 10)")
    parser.add_argument("--space", dest="space_file", metavar="FILE",
                        help="YAML search space merged over kit/conf/tune.yaml's "
                             "(default:/<backbone>: entries of dotted keys)")
    parser.add_argument("--warm-start-from", metavar="features|STUDY",
                        help="enqueue the best trials of this study first (features = the "
                             "features study of the same backbone and suffix)")
    parser.add_argument("--weights", default="auto",
                        help="backbone weights: auto | random | PATH (default: auto)")
    parser.add_argument("--n-jobs", type=int,
                        help="trials run in parallel threads of this process (GPU hosts where "
                             "the model fits several times; default: 1)")
    parser.add_argument("--device", help="cpu | cuda | mps (default: the best available)")
    parser.add_argument("--heartbeat", type=int, metavar="S",
                        help="RDB storages: heartbeat interval in seconds (default: 60)")
    parser.add_argument("--grace", type=int, metavar="S",
                        help="RDB storages: seconds without heartbeat before a trial is failed "
                             "and retried (default: 180)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="start N worker processes on this host sharing the study (after "
                             "creating it once); with GPUs, spread over them round-robin")
    parser.add_argument("--gpus", metavar="LIST",
                        help="one worker per GPU, each with its own CUDA_VISIBLE_DEVICES: "
                             "0,1 | all (with --workers N: N workers over these GPUs)")
    parser.add_argument("--create-only", action="store_true",
                        help="create the studies (and the embedding cache) and stop: run once "
                             "before starting workers on an empty database")


def run(args) -> int:
    # Imported when the command runs, not when ./run.sh <command> --help reads the options.
    from kit.config import load_config, stage_overrides, train_settings, with_flags
    from kit.paths import Paths
    from kit.task import as_data
    from kit.tuning.job import TuneJob
    from kit.tuning.tune import run_tune
    from kit.tuning.workers import launch
    from kit.utils import KitError

    # The stage's arguments, resolved once: this process runs them, or the workers do.
    overrides = stage_overrides(args.config, args.sets)
    train = overrides.pop("train", None) or {}
    if not isinstance(train, dict):
        raise KitError(f"tune: train = {train!r}: give training settings as train.KEY=VALUE "
                       "(e.g. --set train.epochs=20) or a train: mapping in --config")
    try:  # every trial's training settings, checked by the schema before any work
        settings = train_settings(train)
    except KitError as exc:
        raise KitError(f"tune: --set/--config train.*: {exc}") from None
    cfg = load_config("tune", with_flags(overrides, {
        "objective": args.objective, "trials": args.trials, "timeout": args.timeout,
        "storage": args.storage, "folds_per_trial": args.folds_per_trial,
        "n_jobs": args.n_jobs, "heartbeat_interval": args.heartbeat,
        "grace_period": args.grace, "estimate_trials": args.estimate_trials}))
    kwargs = dict(settings=settings, backbones=tuple(args.backbones),
                  study_suffix=args.study_suffix,
                  space_file=args.space_file, warm_start_from=args.warm_start_from,
                  weights=args.weights, seed=args.seed, device=args.device,
                  create_only=args.create_only, estimate=args.estimate)
    paths = Paths.from_root(args.workdir)
    data = as_data(args.data, args.task)  # its task: the classes and the metric to maximise
    if getattr(args, "workers", None) is not None or getattr(args, "gpus", None):
        return launch(TuneJob(paths, data, cfg, **kwargs), args.workers, args.gpus)
    run_tune(paths, data, cfg, **kwargs)
    return 0
