"""``./run.sh validate``: check a dataset against its task and report every problem at once."""
from __future__ import annotations

from collections import Counter

from kit.data.dataset import load_dataset
from kit.task import builtin_tasks, load_task


def add_arguments(parser):
    parser.add_argument("--skip-bad", action="store_true",
                        help="drop the samples and labels-file rows with problems (one warning "
                             "line each) instead of failing")
    # The CLI may come to add --task to every command; then this one is that one.
    if "--task" not in parser._option_string_actions:
        parser.add_argument("--task", default=None, metavar="FILE|NAME",
                            help="the task file describing the data (classes, layout, metric; "
                                 "docs/tasks.md), or a built-in task: "
                                 f"{', '.join(builtin_tasks())} (default: task.yaml in the "
                                 "data folder, else an2dl2526c2v2)")


def run(args) -> int:
    task = load_task(args.task, args.data)
    ds = load_dataset(args.data, skip_bad=args.skip_bad, task=task)
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
