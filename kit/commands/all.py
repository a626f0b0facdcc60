"""``./run.sh all [RUN ...]``: the main job in one command, from the data folder to a checked
submission: validate, clean, patches (each native size the runs need), folds, cv for each run,
optionally tune, blend (a validated submission, its manifest and a ledger row), report, and
optionally the upload. It prints its plan with a time estimate per stage first (measured on
this device), skips what is done, and resumes after a kill (each stage resumes: cv by fold).
"""
from __future__ import annotations

from kit.commands.all_run import AllOptions, run_all
from kit.config import deep_update, stage_overrides, train_settings
from kit.paths import Paths
from kit.task import as_data
from kit.utils import KitError


def add_arguments(parser):
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="BACKBONE or NAME=BACKBONE (a variant named NAME; its own "
                             "settings with --set NAME:KEY=VALUE); default: every backbone "
                             "whose weights are in $KIT_WEIGHTS_DIR")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML file of training settings (train.yaml's keys) for every run")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        metavar="[RUN:]KEY=VALUE",
                        help="a training setting for every run, or with RUN: for that run only")
    parser.add_argument("--weights", action="append", default=[], metavar="BACKBONE=PATH",
                        help="weights of a backbone as cv takes them (auto, random or a path); "
                             "repeatable (default: auto)")
    parser.add_argument("--patch-size", type=int, default=None, metavar="PX",
                        help="one patch cache of this window size for every run (default: "
                             "each backbone's native size)")
    parser.add_argument("--tune", type=int, default=0, metavar="N",
                        help="N trials per backbone (features objective), then cv with the "
                             "best params (default: 0, no tuning)")
    parser.add_argument("--name", default="all", help="the submission's name (default: all)")
    parser.add_argument("--submit", action="store_true",
                        help="upload the submission and wait for its score (needs -m)")
    parser.add_argument("-m", "--message", default=None, help="the submission's message")
    parser.add_argument("--restart", action="store_true",
                        help="retrain every run's folds, even those done (after the data or "
                             "the folds changed, cv refuses to mix old folds in)")
    parser.add_argument("--plan", action="store_true", help="print the plan and stop")


def run(args) -> int:
    from kit.commands.all_plan import parse_runs

    if args.submit and not (args.message or "").strip():
        raise KitError("all --submit: give the submission's message with -m 'what changed'")
    paths = Paths.from_root(args.workdir)
    data = as_data(args.data, args.task)
    specs = args.runs or _local_backbones()
    runs, common = parse_runs(specs, args.sets)
    common = deep_update(stage_overrides(args.config, None), common)
    # Every run's settings checked before any work (a typo stops here, in one line).
    settings = {r.name: train_settings(deep_update(common, r.sets)) for r in runs}
    options = AllOptions(tune=args.tune, name=args.name, seed=args.seed,
                         patch_size=args.patch_size, submit=args.submit, message=args.message,
                         plan=args.plan, restart=args.restart)
    return run_all(paths, data, runs, settings, _weights(args.weights), options)


def _local_backbones() -> list[str]:
    from kit.models.backbones import list_backbones
    from kit.models.weights import local_weights

    found = [b for b in list_backbones() if local_weights(b) is not None]
    if not found:
        raise KitError("all: no run given and no backbone weights in $KIT_WEIGHTS_DIR; name "
                       "the runs (e.g. ./run.sh all phikon) or put weights in "
                       "$KIT_WEIGHTS_DIR/<backbone>")
    return found


def _weights(items) -> dict:
    out = {}
    for item in items:
        bb, eq, value = str(item).partition("=")
        if not eq or not value:
            raise KitError(f"--weights {item!r}: expected BACKBONE=auto|random|PATH")
        out[bb] = value
    return out
