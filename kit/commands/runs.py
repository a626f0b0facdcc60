"""``./run.sh runs``: the cv runs of the work directory, by name, with their backbone, the
settings that differ from the defaults, their OOF score with its interval, and whether that
score is honest."""
from __future__ import annotations

from kit.paths import Paths


def add_arguments(parser):
    pass


def run(args) -> int:
    from kit.ensemble.runs import format_runs, list_runs  # here: it loads the ensemble layer

    print(format_runs(list_runs(Paths.from_root(args.workdir))))
    return 0
