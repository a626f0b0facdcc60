"""``./run.sh cv <backbone>``: one model per fold -> ``runs/<backbone>/oof.csv``, ``test.csv``;
``cv a+b``: one head on both backbones' cached embeddings -> ``runs/a+b/``."""
from __future__ import annotations


def add_arguments(parser):
    from kit.models.backbones import describe_backbones  # the registry: every backbone

    parser.add_argument("backbone", help="backbone to train, or a+b (feature fusion: one "
                        "head on the concatenated cached embeddings of frozen a and b): " +
                        "; ".join(describe_backbones(notes=False)))
    parser.add_argument("--name", default=None, metavar="NAME",
                        help="the run's name: it writes runs/NAME/ (default: the backbone), so "
                             "that variants of one backbone coexist; blend, compare and report "
                             "take run names")
    parser.add_argument("--weights", action="append", default=None, metavar="WEIGHTS",
                        help="auto (pretrained: local folder, cache, else download), random, "
                             "or a weights file/folder (default: auto); for a+b one per "
                             "backbone, --weights a=PATH --weights b=auto (a bare auto or "
                             "random applies to both)")
    parser.add_argument("--fold", type=int, default=None,
                        help="train only this fold (e.g. one job per machine); the backbone's "
                             "files are assembled once every fold is done")
    parser.add_argument("--params", default="tuned",
                        help="tuned settings: tuned (runs/tune/<bb>/best.yaml if it exists), "
                             "best (require it), none, or a YAML file (default: tuned)")
    parser.add_argument("--epochs", type=int, default=None, help="override train.yaml epochs")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="override train.yaml batch_size (lower it on out-of-memory)")
    parser.add_argument("--unfreeze-last", type=int, default=None,
                        help="also train the last N blocks of the backbone (default: 0)")
    parser.add_argument("--train-norm", default=None,
                        help="norm layers left trainable: comma list of batchnorm, groupnorm, "
                             "layernorm, or none (default: train.yaml's, all three); with none "
                             "and no unfrozen block, heads train on cached embeddings")
    parser.add_argument("--no-feature-cache", action="store_true",
                        help="train on pixels even when nothing in the backbone trains (the "
                             "default then trains heads on cached embeddings: no colour "
                             "jitter or CutMix)")
    parser.add_argument("--early-stopping", choices=("inner", "refit", "none", "oof"),
                        default=None,
                        help="how each fold chooses its epoch (default: train.yaml's): inner "
                             "split of its training images, refit on them all after it, none "
                             "(fixed epochs), or oof (on its own OOF images: optimistic scores)")
    parser.add_argument("--device", choices=("cpu", "cuda", "mps"), default=None,
                        help="default: cuda, else mps, else cpu")
    parser.add_argument("--restart", action="store_true",
                        help="retrain finished folds too (only --fold K when given)")


def run(args) -> int:
    # Imported when the command runs, not when ./run.sh <command> --help reads the options.
    from kit.config import stage_overrides, train_settings, with_flags
    from kit.paths import Paths
    from kit.task import as_data
    from kit.training.cv import run_cv
    from kit.training.fusion import parse_weights
    from kit.utils import KitError

    overrides = {"epochs": args.epochs, "batch_size": args.batch_size,
                 "unfreeze_last": args.unfreeze_last, "early_stopping": args.early_stopping}
    if args.train_norm is not None:
        kinds = [k.strip() for k in args.train_norm.split(",") if k.strip()]
        overrides["train_norm"] = [k for k in kinds if k.lower() != "none"]
    for key in ("epochs", "batch_size"):
        if overrides[key] is not None and overrides[key] < 1:
            raise KitError(f"--{key.replace('_', '-')} must be >= 1 (got {overrides[key]})")
    overrides = with_flags(stage_overrides(args.config, args.sets), overrides)
    # The task (its classes and metric) from --task, else the data folder's task.yaml.
    run_cv(Paths.from_root(args.workdir), as_data(args.data, args.task), train_settings(overrides),
           backbone=args.backbone, name=args.name, seed=args.seed,
           weights=parse_weights(args.backbone, args.weights), fold=args.fold,
           params=args.params, device=args.device,
           restart=args.restart, feature_cache=not args.no_feature_cache)
    return 0
