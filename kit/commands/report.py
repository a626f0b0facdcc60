"""``./run.sh report``: write runs/report.html from whatever the stages have written so far."""
from __future__ import annotations

from kit.config import load_config, stage_overrides, with_flags
from kit.paths import Paths


def add_arguments(parser):
    parser.add_argument("--max-thumbs", type=int, default=None,
                        help="junk thumbnails shown at most (default: 120)")


def run(args) -> int:
    # The stage's modules load here, not at the top: ./run.sh report --help stays fast.
    from kit.submission.report import run_report
    from kit.task import as_data

    cfg = load_config("report", with_flags(stage_overrides(args.config, args.sets),
                                           {"max_thumbs": args.max_thumbs}))
    out = run_report(Paths.from_root(args.workdir), as_data(args.data, args.task), cfg)
    print(f"report -> {out}")
    return 0
