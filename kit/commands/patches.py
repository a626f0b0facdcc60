"""``./run.sh patches``: cut K mask-guided windows of every image into a cached array per size.

Options override ``kit/conf/patches.yaml``; the train split holds the clean training images
only, so ``./run.sh clean`` must have run first. A task without masks gets each image's most
tissued windows. ``--backbone NAME`` (repeatable) cuts
windows of each backbone's native size (``size: auto``); caches of several sizes coexist
under ``runs/patches/<size>px/``.
"""
from __future__ import annotations

from kit.config import load_config, stage_overrides, with_flags
from kit.paths import Paths
from kit.task import as_data
from kit.utils import KitError


def add_arguments(parser):
    parser.add_argument("--size", type=int,
                        help="patch side in pixels (default: 128; see --backbone)")
    parser.add_argument("--backbone", action="append",
                        help="cut windows of this backbone's native input size (size: auto; "
                             "224 for ViTs and ImageNet CNNs); repeatable, one cache per size")
    parser.add_argument("--stride", type=int, help="window step in pixels (default: 64)")
    parser.add_argument("--top-k", type=int, dest="top_k",
                        help="patches kept per image (default: 12)")
    parser.add_argument("--select", choices=("top_k", "per_region"),
                        help="top_k: most mask coverage; per_region: shared among the mask's "
                             "regions by area, one at least per region of min_region_px "
                             "(default: top_k)")
    parser.add_argument("--workers", type=int,
                        help="decoding processes; 0 = one per available core (default: 0)")
    parser.add_argument("--split", choices=("train", "test"), action="append",
                        help="build only this split (repeatable; default: train and test)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="drop samples with problems (with a warning) instead of failing")


def resolve_configs(overrides: dict, backbones=None) -> list[dict]:
    """The resolved patches.yaml of each cache to build: one, or one per distinct native size
    of ``backbones`` (then ``size`` must be auto or unset)."""
    from kit.models.backbones import native_size  # here: it loads torch

    if not backbones:
        return [load_config("patches", overrides)]
    given = overrides.get("size")
    if given is not None and str(given).strip().lower() != "auto":
        raise KitError(f"patches: --backbone sets the window size to its native one; drop "
                       f"size={given} (or drop --backbone)")
    sizes = dict.fromkeys(native_size(name) for name in backbones)
    return [load_config("patches", {**overrides, "size": size}) for size in sizes]


def run(args) -> int:
    # The stage's modules load here, not at the top: ./run.sh patches --help stays fast.
    from kit.data.patches import SPLITS, run_patches

    overrides = with_flags(stage_overrides(args.config, args.sets),
                           {"size": args.size, "stride": args.stride, "top_k": args.top_k,
                            "select": args.select, "workers": args.workers})
    data = as_data(args.data, args.task)
    for cfg in resolve_configs(overrides, args.backbone):
        sets = run_patches(Paths.from_root(args.workdir), data, cfg,
                           splits=tuple(args.split or SPLITS), skip_bad=args.skip_bad)
        for split, ps in sets.items():
            n_fb = int(ps.samples["fallback"].sum())
            how = (f"({cfg['select']}), {n_fb} tissue fallback(s)" if data.task.has_masks
                   else "(most tissue: the task has no masks)")
            print(f"  {split:<5} {ps.array.shape[0]} images x {ps.array.shape[1]} patches "
                  f"of {ps.array.shape[2]} px {how}, key {ps.key[:12]} -> {ps.folder}")
    return 0
