"""``./run.sh bench <what>``: benchmarks, one module per subject under ``kit/bench/``, registered
in :data:`kit.bench.BENCHES`.

Each ``kit/bench/<what>.py`` has ``add_arguments(parser)`` and ``run(args)``, like a command.
A module is imported only when its benchmark is asked for (even ``--help`` of the others
stays fast), and a benchmark whose module does not exist yet fails with a clear message.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from kit.bench import BENCHES
from kit.cli import add_common_arguments
from kit.utils import KitError


class _LazyBenchParser(argparse.ArgumentParser):
    """Sub-parser that imports ``kit.bench.<name>`` and adds its options when first used."""

    def __init__(self, *args, bench: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._bench = bench
        self._loaded = False

    def parse_known_args(self, args=None, namespace=None):
        if not self._loaded:
            self._loaded = True
            _attach(self, self._bench)
        return super().parse_known_args(args, namespace)


def _attach(parser, name: str) -> None:
    add_common_arguments(parser)
    for action in parser._actions:
        if action.dest in ("data", "workdir", "seed"):
            # Unset here unless given after <what>, so a value given before it survives
            # (argparse copies every sub-parser default over the parent's values).
            action.default = argparse.SUPPRESS
    try:
        module = importlib.import_module(f"kit.bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"kit.bench.{name}":
            raise  # a missing dependency of an existing module is a real bug; show it
        parser.set_defaults(_bench_run=_missing(name))
        return
    module.add_arguments(parser)
    parser.set_defaults(_bench_run=module.run)


def _missing(name: str):
    def run(args):
        raise KitError(f"bench {name}: not available yet (kit/bench/{name}.py does not exist); "
                       f"available: {', '.join(available())}")
    return run


def available() -> list[str]:
    """Benchmarks whose module exists."""
    here = Path(__file__).resolve().parent.parent / "bench"
    return [name for name in BENCHES if (here / f"{name}.py").exists()]


def add_arguments(parser):
    sub = parser.add_subparsers(dest="bench", metavar="<what>", parser_class=_LazyBenchParser)
    for name, help_line in BENCHES.items():
        sub.add_parser(name, help=help_line, description=help_line, bench=name)


def run(args) -> int:
    runner = getattr(args, "_bench_run", None)
    if runner is None:
        raise KitError(f"bench: say what to benchmark: {' | '.join(BENCHES)} "
                       "(e.g. ./run.sh bench patches)")
    return runner(args)
