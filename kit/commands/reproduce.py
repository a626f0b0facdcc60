"""``./run.sh reproduce MANIFEST``: re-run a blend and check the CSV is byte-identical.

Exit 0 when identical, 1 when not (with what differs), 2 when it cannot be checked.
"""
from __future__ import annotations

import os


def add_arguments(parser):
    parser.add_argument("manifest", help="submissions/<time>_<name>.json written by blend")
    parser.add_argument("--out", default=None,
                        help="also write the reproduced CSV here (default: a temporary file)")


def run(args) -> int:
    from kit.submission.reproduce import reproduce

    # --workdir / --data given explicitly win; otherwise the manifest says where it lives
    # (<workdir>/submissions/) and which dataset it used.
    workdir = None if args.workdir == os.environ.get("KIT_WORKDIR", ".") else args.workdir
    data = None if args.data == os.environ.get("KIT_DATA", "data") else args.data
    report = reproduce(args.manifest, data=data, workdir=workdir, out=args.out,
                       default_data=args.data)
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
