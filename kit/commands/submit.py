"""``./run.sh submit [CSV] -m MSG``: validate a submission file and upload it to Kaggle."""
from __future__ import annotations

from kit.config import load_config, stage_overrides, with_flags
from kit.paths import Paths
from kit.task import as_data


def add_arguments(parser):
    parser.add_argument("csv", nargs="?", default=None,
                        help="submission file (default: submissions/latest.csv)")
    parser.add_argument("-m", "--message", required=True,
                        help="submission description shown on Kaggle")
    parser.add_argument("-c", "--competition", default=None,
                        help="Kaggle competition slug (default: the manifest's, else the "
                             "task's kaggle, else kit/conf/submit.yaml's competition)")
    parser.add_argument("--wait", action="store_true",
                        help="poll until scored; print the public score beside the nested CV "
                             "estimate")
    parser.add_argument("--poll-interval", type=float, default=None,
                        help="seconds between status polls with --wait (default: 15)")
    parser.add_argument("--wait-timeout", type=float, default=None,
                        help="give up waiting after this many seconds (default: 1800)")
    parser.add_argument("--dry-run", action="store_true",
                        help="do every check, upload nothing")


def run(args) -> int:
    # The stage's modules load here, not at the top: ./run.sh submit --help stays fast.
    from kit.submission.submit import run_submit

    cfg = load_config("submit", with_flags(stage_overrides(args.config, args.sets),
                                           {"poll_interval": args.poll_interval,
                                            "wait_timeout": args.wait_timeout}))
    run_submit(Paths.from_root(args.workdir), as_data(args.data, args.task) if args.data
               else None, cfg,
               message=args.message, csv=args.csv, competition=args.competition,
               wait=args.wait, dry_run=args.dry_run)
    return 0
