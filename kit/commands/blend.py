"""``./run.sh blend``: weighted blend of backbones + class biases -> submissions/latest.csv."""
from __future__ import annotations

from kit.config import load_config, stage_overrides
from kit.paths import Paths
from kit.task import as_data


def add_arguments(parser):
    parser.add_argument("backbones", nargs="*", metavar="BACKBONE",
                        help="backbones to blend (default: every runs/<bb>/ with oof.csv, "
                             "test.csv and metrics.json)")
    parser.add_argument("--name", default="blend",
                        help="submission name: submissions/<UTC time>_<name>.csv (default: blend)")
    parser.add_argument("--objective", choices=("f1", "metric", "logloss"), default="f1",
                        help="what the weight search optimises on the OOF rows: the task's "
                             "metric (f1 or metric: the same; f1 since it was macro F1 "
                             "alone) or logloss (default: f1); class biases always maximise "
                             "the task's metric")
    parser.add_argument("--weight-views", action="store_true",
                        help="weight each TTA view of each backbone (runs/<bb>/tta/) instead "
                             "of the TTA mean")


def run(args) -> int:
    # The stage's modules load here, not at the top: ./run.sh blend --help stays fast.
    from kit.ensemble.blend_summary import format_summary
    from kit.submission.blend_output import run_blend

    cfg = load_config("blend", stage_overrides(args.config, args.sets))
    result = run_blend(Paths.from_root(args.workdir), as_data(args.data, args.task), cfg,
                       backbones=args.backbones or None, name=args.name,
                       objective=args.objective, weight_views=args.weight_views, seed=args.seed)
    print(format_summary(result))
    return 0
