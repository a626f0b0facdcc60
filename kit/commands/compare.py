"""``./run.sh compare RUN_A RUN_B``: is B's OOF score really above A's, or noise?

Both runs are scored in the task's metric (``--task``, else the data folder's task.yaml, else
AN2DL's macro F1). A paired bootstrap over the images both runs predicted out of fold: each
resample draws the
same images for both, so what they share (hard images, noisy labels) cancels out of the
difference. It measures the noise of drawing ~600 images, not that of training seeds
(:mod:`kit.ensemble.compare`).
"""
from __future__ import annotations


def add_arguments(parser):
    from kit.metrics import BOOT_SEED, N_BOOT

    parser.add_argument("run_a", metavar="RUN_A",
                        help="a cv run: its name under runs/ (e.g. phikon) or a folder holding "
                             "oof.csv (+ metrics.json)")
    parser.add_argument("run_b", metavar="RUN_B", help="the run compared with RUN_A (B - A)")
    parser.add_argument("--n-boot", type=int, default=N_BOOT, metavar="N",
                        help=f"bootstrap resamples of the images (default: {N_BOOT})")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the result (scores, intervals, P(B > A)) to this JSON "
                             "file")
    # The seed of the resamples: 0 as for every interval the kit records (metrics.json), so
    # that A's interval here is the one cv printed.
    parser.set_defaults(seed=BOOT_SEED)
    for action in parser._actions:
        if action.dest == "seed":
            action.help = f"seed of the bootstrap resamples (default: {BOOT_SEED})"


def run(args) -> int:
    # Imported when the command runs, not when ./run.sh <command> --help reads the options.
    from kit.ensemble.compare import compare_runs, summary_line
    from kit.paths import Paths
    from kit.task import as_data
    from kit.utils import atomic_write_json

    result = compare_runs(args.run_a, args.run_b, Paths.from_root(args.workdir),
                          n_boot=args.n_boot, seed=args.seed,
                          task=as_data(args.data, args.task).task)
    for note in result["notes"]:
        print(f"note: {note}")
    print(summary_line(result))
    print(result["reading"])
    if args.json:
        atomic_write_json(args.json, result)
        print(f"compare -> {args.json}")
    return 0
