"""``./run.sh choose``: the two submissions to select for the private leaderboard, their
estimated private scores, P(first beats second) and why each (``kit.submission.choose``)."""
from __future__ import annotations


def add_arguments(parser):
    from kit.submission.shakeup import N_DRAWS, SEED

    parser.add_argument("--n-draws", type=int, default=N_DRAWS, metavar="N",
                        help=f"private parts drawn from the nested OOF rows (default: {N_DRAWS})")
    # The draws' seed: fixed like every interval's, so the same ledger gives the same advice.
    parser.set_defaults(seed=SEED)
    for action in parser._actions:
        if action.dest == "seed":
            action.help = f"seed of the drawn private parts (default: {SEED})"


def run(args) -> int:
    from kit.paths import Paths
    from kit.submission.choose import choose, report_lines
    from kit.task import load_task
    from kit.utils import KitError

    if args.n_draws < 1:
        raise KitError(f"--n-draws must be >= 1 (got {args.n_draws})")
    result = choose(Paths.from_root(args.workdir), load_task(args.task, args.data),
                    n_draws=args.n_draws, seed=args.seed)
    for line in report_lines(result):
        print(line)
    return 0
