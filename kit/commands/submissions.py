"""``./run.sh submissions [--refresh]``: the ledger of submissions (``submissions/ledger.csv``),
best first by estimated private score; ``--refresh`` reads the leaderboard scores from Kaggle
first."""
from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("--refresh", action="store_true",
                        help="first list the competition's submissions on Kaggle and store "
                             "their public (and, once it has ended, private) scores in the "
                             "manifests' upload records")
    parser.add_argument("-c", "--competition", default=None, metavar="SLUG",
                        help="competition to list with --refresh (default: the manifests', "
                             "else the task's kaggle slug)")


def run(args) -> int:
    # The stage's modules load here, not at the top: ./run.sh submissions --help stays fast.
    from kit.paths import Paths
    from kit.submission import ledger
    from kit.task import load_task

    paths = Paths.from_root(args.workdir)
    task = load_task(args.task, args.data)
    manifests = ledger.load_manifests(paths, task)
    if args.refresh:
        from kit.submission.refresh import competitions, refresh, summary

        for slug in competitions(args.competition, manifests, task):
            for line in summary(refresh(manifests, slug), slug):
                print(line)
            manifests = ledger.load_manifests(paths, task)  # the records just stored
    path, df = ledger.write_ledger(paths, task, manifests)
    if df.empty:
        print(f"no submissions in {paths.submissions_dir}: ./run.sh blend writes one")
        return 0
    print(ledger.format_table(df))
    print(f"ledger -> {path}")
    return 0
