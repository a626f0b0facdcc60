"""``./run.sh folds``: stratified, image-grouped K-fold split -> ``folds/folds.csv``.

Groups: shared mask files, near-duplicates (``clean``), the task's patient column
(``labels.group``) and ``folds/groups.csv``; one group never spans two folds.
"""
from __future__ import annotations

from kit.config import load_config, stage_overrides, with_flags
from kit.paths import Paths
from kit.task import as_data
from kit.utils import KitError


def add_arguments(parser):
    parser.add_argument("--n-splits", type=int, default=None,
                        help="number of folds (default: 5, from kit/conf/folds.yaml)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing folds/folds.csv that holds a different split "
                             "(out-of-fold predictions made with the old one become invalid)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="drop the samples and labels-file rows with problems (one "
                             "warning line each) instead of failing")


def run(args) -> int:
    # The stage's modules load here, not at the top: ./run.sh folds --help stays fast.
    from kit.data.folds import folds_hash, run_folds

    if args.n_splits is not None and args.n_splits < 2:
        raise KitError(f"--n-splits {args.n_splits}: need at least 2 folds")
    paths = Paths.from_root(args.workdir)
    cfg = load_config("folds", with_flags(stage_overrides(args.config, args.sets),
                                          {"n_splits": args.n_splits}))
    data = as_data(args.data, args.task)
    run_folds(paths, data, cfg, seed=args.seed, force=args.force, skip_bad=args.skip_bad)
    print(f"folds -> {paths.folds_csv} (sha256 {folds_hash(paths)[:12]})")
    return 0
