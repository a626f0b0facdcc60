"""``./run.sh clean``: flag junk training images -> folds/outliers.csv and a review page."""
from __future__ import annotations

from kit.config import load_config, stage_overrides, with_flags
from kit.paths import Paths
from kit.task import as_data


def add_arguments(parser):
    parser.add_argument("--skip-bad", action="store_true",
                        help="drop the samples and labels-file rows with problems (one "
                             "warning line each) instead of failing")
    parser.add_argument("--green-share", type=float, default=None, metavar="F",
                        help="flag an image when saturated-green pixels cover more than this "
                             "share of it (default 0.001 = 0.1%%)")
    parser.add_argument("--cartoon-strict", type=float, default=None, metavar="S",
                        help="cartoon score that flags an image on its own (default 0.6)")
    parser.add_argument("--cartoon-paired", type=float, default=None, metavar="S",
                        help="cartoon score that flags an image sharing its mask file with a "
                             "more H&E-like one (default 0.25)")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding processes (default: one per available core)")


def run(args) -> int:
    # The stage's modules load here, not at the top: ./run.sh clean --help stays fast.
    import pandas as pd

    from kit.data import clean
    from kit.data.dataset import load_dataset
    from kit.data.neardup import near_duplicates_csv

    cfg = load_config("clean", with_flags(stage_overrides(args.config, args.sets), {
        "green.min_share": args.green_share, "cartoon.strict": args.cartoon_strict,
        "cartoon.paired": args.cartoon_paired, "workers": args.workers}))
    paths = Paths.from_root(args.workdir)
    data = as_data(args.data, args.task)
    # Loaded here once: the stage takes the loaded dataset, and the summary below counts it.
    dataset = load_dataset(data, skip_bad=args.skip_bad)
    outliers = clean.run_clean(paths, dataset, cfg)
    counts = outliers["reason"].value_counts()
    print(f"{dataset.root}: {len(outliers)} of {len(dataset.train)} training images flagged")
    for reason in clean.REASONS:
        if reason in data.task.junk:
            print(f"  {reason:<8} {int(counts.get(reason, 0))}")
    if not data.task.junk:
        print(f"  no junk detector: task {data.task.name} lists junk: []")
    overrides = clean.load_overrides(paths)
    if len(overrides):
        kept = len(clean.clean_train_samples(dataset, paths))
        print(f"overrides: {len(overrides)} row(s) in {paths.overrides_csv} -> "
              f"{kept} training images kept")
    near_csv = near_duplicates_csv(paths)
    near = pd.read_csv(near_csv)
    print(f"near-duplicate groups: {near['group'].nunique()} "
          f"({int((near['split'] == 'train').sum())} training images; folds keeps each group "
          "in one fold)")
    print(f"outliers -> {paths.outliers_csv}")
    print(f"near-dup -> {near_csv}")
    print(f"review   -> {paths.clean_dir / 'review.html'}")
    return 0

