"""``./run.sh blend``: weighted blend of backbones + class biases -> submissions/latest.csv."""
from __future__ import annotations

from kit.config import load_config, stage_overrides
from kit.paths import Paths


def add_arguments(parser):
    parser.add_argument("backbones", nargs="*", metavar="BACKBONE",
                        help="backbones to blend (default: every runs/<bb>/ with oof.csv, "
                             "test.csv and metrics.json)")
    parser.add_argument("--name", default="blend",
                        help="submission name: submissions/<UTC time>_<name>.csv (default: blend)")
    parser.add_argument("--objective", choices=("f1", "logloss"), default="f1",
                        help="what the weight search optimises on the OOF rows (default: f1); "
                             "class biases always maximise macro F1")
    parser.add_argument("--weight-views", action="store_true",
                        help="weight each TTA view of each backbone (runs/<bb>/tta/) instead "
                             "of the TTA mean")


def run(args) -> int:
    # The stage's modules load here, not at the top: ./run.sh blend --help stays fast.
    from kit.ensemble.blend_summary import format_summary
    from kit.submission.blend_output import run_blend

    cfg = load_config("blend", stage_overrides(args.config, args.sets))
    result = run_blend(Paths.from_root(args.workdir), args.data, cfg,
                       backbones=args.backbones or None, name=args.name,
                       objective=args.objective, weight_views=args.weight_views, seed=args.seed)
    print(format_summary(result))
    return 0
