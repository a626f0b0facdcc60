"""Command-line entry point: ``python -m kit <command>`` (``./run.sh <command>``).

Each command lives in ``kit/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args)``; modules are imported only when their command runs, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from pathlib import Path

from kit import __version__
from kit.bench import BENCHES
from kit.log import set_verbosity
from kit.process import run_for_user

# name -> one-line help; the module is kit.commands.<name with - replaced by _>
COMMANDS = {
    "demo": "generate the demo dataset under runs/demo and run `all` on it (every stage)",
    "all": "the main job in one command: validate .. cv per run .. blend, report [, submit]",
    "validate": "check a dataset folder and report every problem at once",
    "clean": "flag junk training images (green stains, cartoons) -> folds/outliers.csv",
    "patches": "cut the top-K mask-coverage (or tissue) patches of every image into a cached array",
    "folds": "stratified, image-grouped K-fold split -> folds/folds.csv",
    "cv": "train one model per fold -> runs/<backbone>/oof.csv and test.csv",
    "runs": "the cv runs by name: backbone, changed settings, OOF score, honest or not",
    "tune": "Optuna search of head and augmentation settings per backbone",
    "compare": "paired bootstrap of two cv runs' OOF macro F1: B - A, its interval, P(B > A)",
    "blend": "weighted blend of backbones + class biases -> submissions/latest.csv",
    "submit": "upload a submission file to Kaggle",
    "submissions": "the ledger of submissions, best first by estimated private score",
    "choose": "the two submissions to select for the private leaderboard, and why",
    "reproduce": "re-run a blend from its manifest and check the CSV is byte-identical",
    "report": "write runs/report.html summarising data, CV, blend and submissions",
    "config": "every setting: its default, allowed values and description (kit/conf/)",
    "bench": "benchmarks: " + " | ".join(BENCHES),
}


TASKS_DIR = Path(__file__).parent / "conf" / "tasks"  # the built-in tasks (kit.task.TASKS_DIR)

# Stages with a config group: they take --config FILE and --set KEY=VALUE (kit.config).
CONFIG_GROUPS = {"clean": "clean", "patches": "patches", "folds": "folds", "cv": "train",
                 "tune": "tune", "blend": "blend", "submit": "submit", "report": "report"}


def add_config_arguments(parser: argparse.ArgumentParser, group: str) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"YAML file of {group} settings (kit/conf/{group}.yaml's keys, "
                             "nested or dotted), applied over the defaults")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="one setting, dotted key (e.g. --set head.depth=2); repeatable; "
                             "wins over --config, loses to this command's own flags")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=os.environ.get("KIT_DATA", "data"),
                        help="dataset root, laid out as its task says (AN2DL: train_data/, "
                             "test_data/, train_labels.csv) (default: $KIT_DATA, else data/)")
    # The built-in tasks by their files: importing kit.task (pydantic) would slow --help.
    builtin = ", ".join(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))
    parser.add_argument("--task", default=os.environ.get("KIT_TASK"), metavar="FILE|NAME",
                        help="the competition's task file (classes, layout, metric; "
                             f"docs/tasks.md) or a built-in task ({builtin}) (default: "
                             "$KIT_TASK, else task.yaml in the data folder, else "
                             "an2dl2526c2v2)")
    parser.add_argument("--workdir", default=os.environ.get("KIT_WORKDIR", "."),
                        help="where folds/, runs/ and submissions/ live (default: .)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    quiet = parser.add_mutually_exclusive_group()
    quiet.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                       default=0, help="warnings and results only")
    quiet.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                       help="debug lines too")


class _CommandListFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps ``--help``'s command list at one line per command.

    argparse wraps at the terminal width (80 columns when piped) and measures sub-command
    names at the wrong indent, which pushes the longest name's help onto a line of its own.
    """

    def __init__(self, prog):
        width = max(120, shutil.get_terminal_size().columns)
        super().__init__(prog, width=width, max_help_position=30)
        self._action_max_length = max(map(len, COMMANDS)) + 4  # 4: the sub-command indent


def build_parser(names=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=os.environ.get("KIT_PROG", "./run.sh"),
        description="an2dl-kit: one command per stage, from raw data to a Kaggle submission.\n"
                    "  ./run.sh test        run the test suite\n"
                    "  ./run.sh kaggle ...  the venv's kaggle CLI",
        formatter_class=_CommandListFormatter)
    parser.add_argument("--version", action="version", version=f"an2dl-kit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, help_line in COMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=help_line)
        if names is None or name in names:
            module = _module(name)
            add_common_arguments(p)
            if name in CONFIG_GROUPS:
                add_config_arguments(p, CONFIG_GROUPS[name])
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def _module(name: str):
    return importlib.import_module(f"kit.commands.{name.replace('-', '_')}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(names={command} if command in COMMANDS else set())
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    set_verbosity(getattr(args, "verbosity", 0))
    return run_for_user(lambda: args._run(args),
                        "interrupted: finished outputs are kept; rerun the same command to "
                        "resume")
