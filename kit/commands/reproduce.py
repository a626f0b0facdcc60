"""``./run.sh reproduce MANIFEST``: re-run a blend and check the CSV is byte-identical.

Exit 0 when identical, 1 when not (with what differs), 2 when it cannot be checked.
"""
from __future__ import annotations

import os

from kit.paths import Paths


def add_arguments(parser):
    parser.add_argument("manifest", help="submissions/<time>_<name>.json written by blend")
    parser.add_argument("--out", default=None,
                        help="also write the reproduced CSV here (default: a temporary file)")
    # Unset unless given: the manifest says where it lives and which dataset it used, and a
    # --workdir or --data given explicitly wins, even one equal to the usual default.
    for action in parser._actions:
        if action.dest == "workdir":
            action.default = None
            action.help = ("where folds/, runs/ and submissions/ live (default: the folder "
                           "holding the manifest's submissions/, else the one it records)")
        elif action.dest == "data":
            action.default = None
            action.help = ("dataset root (default: the one the manifest records, while it "
                           "exists; else $KIT_DATA, else data/)")


def run(args) -> int:
    # The stage's modules load here, not at the top: ./run.sh reproduce --help stays fast.
    from kit.submission.reproduce import run_reproduce

    paths = Paths.from_root(args.workdir) if args.workdir is not None else None
    report = run_reproduce(paths, args.data, None, manifest=args.manifest, out=args.out,
                           default_data=os.environ.get("KIT_DATA", "data"), task=args.task)
    for line in report.notes:
        print(f"note: {line}")
    if report.identical:
        print(f"identical: the re-run blend reproduces {report.recorded_csv} byte for byte")
        for line in report.differences:  # e.g. an input changed without changing the output
            print(f"  (input changed, output unaffected) {line}")
        return 0
    print(f"MISMATCH: the re-run blend does not reproduce {report.recorded_csv}")
    for line in report.differences:
        print(f"  {line}")
    return 1
