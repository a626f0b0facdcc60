"""``./run.sh validate``: check a dataset and report every problem at once."""
from __future__ import annotations

from collections import Counter

from kit.data.dataset import load_dataset


def add_arguments(parser):
    parser.add_argument("--skip-bad", action="store_true",
                        help="drop the samples and train_labels.csv rows with problems (one "
                             "warning line each) instead of failing")


def run(args) -> int:
    ds = load_dataset(args.data, skip_bad=args.skip_bad)
    counts = Counter(s.label for s in ds.train)
    print(f"{ds.root}: {len(ds.train)} training pairs, {len(ds.test)} test pairs")
    for label, n in sorted(counts.items()):
        print(f"  {label:<16} {n}")
    return 0
