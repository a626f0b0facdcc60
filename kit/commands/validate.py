"""``./run.sh validate``: check a dataset against its task and report every problem at once."""
from __future__ import annotations

from collections import Counter

from kit.data.dataset import load_dataset
from kit.task import as_data


def add_arguments(parser):
    # --task is the common one (kit.cli): a task file, a built-in task, or the data's task.yaml
    parser.add_argument("--skip-bad", action="store_true",
                        help="drop the samples and labels-file rows with problems (one warning "
                             "line each) instead of failing")


def run(args) -> int:
    data = as_data(args.data, args.task)
    task = data.task
    ds = load_dataset(data, skip_bad=args.skip_bad)
    what = "pairs" if task.has_masks else "images"
    print(f"{ds.root}: {len(ds.train)} training {what}, {len(ds.test)} test {what}")
    counts = Counter(s.label for s in ds.train)
    for label, n in sorted(counts.items()):
        print(f"  {label:<16} {n}")
    for c in task.classes:
        if c not in counts:
            print(f"  {c:<16} 0 (no training image: this class cannot be learnt)")
    source = "built-in" if task.builtin else str(task.source or "given")
    print(f"task {task.name} ({source}): {len(task.classes)} classes, metric {task.metric}, "
          f"{'masks' if task.has_masks else 'no masks'}")
    if task.has_groups:
        groups = Counter(s.group for s in ds.train if s.group is not None)
        loose = sum(s.group is None for s in ds.train)
        largest = max(groups.values(), default=0)
        print(f"  {len(groups)} {task.labels.group} groups (largest {largest} images)"
              + (f", {loose} images without one (each its own group)" if loose else ""))
    if not ds.test:
        print(f"  no test images: images.test {task.images.test!r} matched no file")
    return 0
