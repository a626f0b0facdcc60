"""``./run.sh patches``: cut the top-K mask-coverage patches of every image into a cached array.

Options override ``kit/conf/patches.yaml``; the train split holds the clean training images
only, so ``./run.sh clean`` must have run first.
"""
from __future__ import annotations

from kit.paths import Paths


def add_arguments(parser):
    parser.add_argument("--size", type=int, help="patch side in pixels (default: 128)")
    parser.add_argument("--stride", type=int, help="window step in pixels (default: 64)")
    parser.add_argument("--top-k", type=int, dest="top_k",
                        help="patches kept per image, by mask coverage (default: 12)")
    parser.add_argument("--workers", type=int,
                        help="decoding processes; 0 = one per available core (default: 0)")
    parser.add_argument("--split", choices=("train", "test"), action="append",
                        help="build only this split (repeatable; default: train and test)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="drop samples with problems (with a warning) instead of failing")


def run(args) -> int:
    from kit.config import stage_overrides, with_flags
    from kit.data.patches import SPLITS, run_patches

    overrides = with_flags(stage_overrides(args.config, args.sets),
                           {"size": args.size, "stride": args.stride, "top_k": args.top_k,
                            "workers": args.workers})
    sets = run_patches(args.data, Paths.from_root(args.workdir), overrides,
                       splits=tuple(args.split or SPLITS), skip_bad=args.skip_bad)
    for split, ps in sets.items():
        n_fb = int(ps.samples["fallback"].sum())
        print(f"  {split:<5} {ps.array.shape[0]} images x {ps.array.shape[1]} patches "
              f"of {ps.array.shape[2]} px, {n_fb} tissue fallback(s), key {ps.key[:12]}")
    return 0
