"""``./run.sh bench tune``: the cost of one tuning trial, ``features`` against ``full``.

On a synthetic feature set the size of the real data (581 images x 12 patches, 768-d, each
test-time view, 5 folds) one trial of the ``features`` objective is timed end to end: the
same code path as ``./run.sh tune`` (a head per fold, early stopping, pooled OOF macro F1).

A ``full`` trial (:func:`kit.training.cv.run_cv` over 5 folds) of the same head on a CPU takes hours
for ``efficientnet_b0``, so it is extrapolated from measured pieces of the kit's own loop
(:func:`kit.training.train.fit_fold` and :func:`kit.training.predict.predict`) on real-size patches:

- one training epoch on ``--subset`` images -> training patches/s,
- a prediction pass over the TTA views -> predicted patches/s,

then, per fold, ``E x (train patches / train rate + val patches / predict rate)`` (training and
the per-epoch validation of the ``id`` view) plus the final OOF and test predictions over the
views, summed over the folds. ``E`` is the number of epochs the features trial ran in each
fold (like for like); the bound with the full epoch budget is printed too. ``--complete``
also runs a real full trial of the tiny backbone at the real size (slow) to check the
extrapolation. Results go to ``runs/bench/tune.json``. Targets: a features trial under 15 s,
and at least 50x cheaper than a full trial on efficientnet_b0.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from kit import CLASSES
from kit.config import train_settings
from kit.paths import Paths
from kit.utils import atomic_write_json, seed_everything

TARGET_SECONDS = 15.0
TARGET_RATIO = 50.0


def add_arguments(parser):
    parser.add_argument("--images", type=int, default=581, help="training images (default: 581)")
    parser.add_argument("--test-images", type=int, default=477, help="test images (default: 477)")
    parser.add_argument("--k", type=int, default=12, help="patches per image (default: 12)")
    parser.add_argument("--dim", type=int, default=768, help="feature size (default: 768)")
    parser.add_argument("--folds", type=int, default=5, help="folds (default: 5)")
    parser.add_argument("--size", type=int, default=128, help="patch side in px (default: 128)")
    parser.add_argument("--backbones", default="tiny_cnn,efficientnet_b0",
                        help="backbones of the full trials, random weights "
                             "(default: tiny_cnn,efficientnet_b0)")
    parser.add_argument("--subset", type=int, default=24,
                        help="images in the measured training epoch of a full trial (default: 24)")
    parser.add_argument("--complete", action="store_true",
                        help="also run one real full trial of the first backbone at the real "
                             "size (slow: checks the extrapolation)")


# --------------------------------------------------------------------------- synthetic data
def synthetic_features(n: int, k: int, n_views: int, dim: int, n_folds: int, seed: int = 0):
    """A :class:`kit.training.feature_cv.FeatureCV` over generated embeddings
    (:func:`kit.data.synth.embeddings`).

    Class means plus a per-image offset plus per-patch noise; the class shares follow the
    real clean training set; stratified folds.
    """
    import pandas as pd

    from kit.data.synth import embeddings, stratified_folds
    from kit.training.feature_cv import FeatureCV
    from kit.training.features import Features, cache_views
    from kit.training.settings import train_config, tta_views

    x, y = embeddings(n, k, n_views, dim, seed)
    ids = [f"img_{i:04d}.png" for i in range(n)]
    labels = [CLASSES[c] for c in y]
    fold = stratified_folds(y, n_folds, rng=seed)
    samples = pd.DataFrame({"sample_index": ids, "label": labels, "fallback": False})
    folds = pd.DataFrame({"sample_index": ids, "label": labels, "fold": fold})
    cfg = train_config(train_settings())
    views = tta_views(cfg["tta"])
    feats = Features(x, samples, cache_views(views), "synthetic", Path("<memory>"), True)
    return FeatureCV(feats, folds, cfg, views, device="cpu", seed=seed)


# --------------------------------------------------------------------------- measurements
def time_features_trial(fcv, folds) -> dict:
    """One trial exactly as the tune objective runs it (default head and training config)."""
    from kit.tuning.evaluators import FeaturesEvaluator, evaluate

    ev = FeaturesEvaluator.from_feature_cv(fcv)
    epochs = []
    run_fold, cleanup = ev.trial({}, "bench")

    def counted(k):
        s = run_fold(k)
        epochs.append(ev.last_fit.epochs)
        return s
    t0 = time.perf_counter()
    value, scores = evaluate(counted, folds)
    seconds = time.perf_counter() - t0
    cleanup()
    return {"seconds": seconds, "oof_macro_f1": value, "epochs_per_fold": epochs,
            "per_fold": [s.score for s in scores]}  # the built-in task: macro F1


def measure_full(backbone: str, subset: int, k: int, size: int, views, seed: int = 0) -> dict:
    """Training and prediction throughput of the kit's loop for ``backbone`` (random weights)."""
    import numpy as np

    from kit.data.synth import tinted_patches
    from kit.training.build import build_model
    from kit.training.predict import predict
    from kit.training.settings import train_config
    from kit.training.train import fit_fold

    cfg = train_config(train_settings({"epochs": 1, "patience": 0, "num_workers": 0}))
    n_val = max(2, subset // 4)
    y = np.arange(subset + n_val) % 4
    array = tinted_patches(subset + n_val, k, size, y, seed)
    tr, va = np.arange(subset), np.arange(subset, subset + n_val)
    model, n_trainable = build_model(backbone, cfg, "random", patch_size=size)
    # Warm-up pass (allocator, kernels) so the timed epoch is a steady-state one.
    predict(model, array, va[:1], ("id",), batch_size=2 * int(cfg["batch_size"]))
    t0 = time.perf_counter()
    fit_fold(model, array, tr, y[tr], va, y[va], cfg, seed=seed, desc=f"bench {backbone}")
    epoch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    predict(model, array, va, views, batch_size=2 * int(cfg["batch_size"]))
    pred_s = time.perf_counter() - t0
    pred_rate = n_val * k * len(views) / pred_s
    train_s = max(1e-9, epoch_s - n_val * k / pred_rate)  # the epoch minus its validation pass
    return {"backbone": backbone, "trainable_params": n_trainable, "train_patches": subset * k,
            "train_rate": subset * k / train_s, "predict_rate": pred_rate,
            "measured_epoch_seconds": epoch_s}


def extrapolate(m: dict, n_images: int, n_test: int, k: int, n_views: int, fold_sizes,
                epochs_per_fold) -> tuple[float, list[str]]:
    """Seconds of a full trial from measured rates, and the lines that show the sum."""
    total, lines = 0.0, []
    for f, (n_val, e) in enumerate(zip(fold_sizes, epochs_per_fold)):
        n_tr = n_images - n_val
        train = e * n_tr * k / m["train_rate"]
        val = e * n_val * k / m["predict_rate"]
        final = (n_val + n_test) * k * n_views / m["predict_rate"]
        total += train + val + final
        lines.append(f"fold {f}: {e} x ({n_tr}x{k} / {m['train_rate']:.0f} + {n_val}x{k} / "
                     f"{m['predict_rate']:.0f}) + ({n_val}+{n_test})x{k}x{n_views} / "
                     f"{m['predict_rate']:.0f} = {train + val + final:,.0f} s")
    return total, lines


def complete_full_trial(backbone: str, args, workdir) -> float:
    """A real full trial (run_cv over every fold) of ``backbone`` on real-size patches."""
    from kit.data.synth import write_patch_workdir
    from kit.tuning.evaluators import FullEvaluator, evaluate

    paths = write_patch_workdir(workdir, n_train=args.images, n_test=args.test_images, k=args.k,
                                size=args.size, n_folds=args.folds, seed=0)
    ev = FullEvaluator(backbone, paths, train_settings(), weights="random")
    run_fold, cleanup = ev.trial({}, "bench")
    t0 = time.perf_counter()
    try:
        evaluate(run_fold, list(range(args.folds)))
    finally:
        cleanup()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- command
def run(args) -> int:
    import numpy as np
    import torch

    seed_everything(args.seed)
    paths = Paths.from_root(args.workdir)
    fcv = synthetic_features(args.images, args.k, 3, args.dim, args.folds, args.seed)
    views = fcv.views
    folds = list(range(args.folds))
    print(f"bench tune: {args.images} images x {args.k} patches x {len(fcv.train.views)} views "
          f"x {args.dim}-d, {args.folds} folds, torch threads {torch.get_num_threads()}")
    feat = time_features_trial(fcv, folds)
    epochs = feat["epochs_per_fold"]
    print(f"features trial: {feat['seconds']:.2f} s (epochs per fold {epochs}, OOF macro F1 "
          f"{feat['oof_macro_f1']:.3f}); target < {TARGET_SECONDS:.0f} s: "
          f"{'met' if feat['seconds'] < TARGET_SECONDS else 'NOT met'}")
    fold_sizes = [int((fcv.folds.fold == f).sum()) for f in folds]
    budget = [int(fcv.cfg["epochs"])] * len(folds)
    result = {"features_trial": feat, "full": {}, "shape": [args.images, args.k, 3, args.dim],
              "folds": args.folds, "threads": torch.get_num_threads()}
    for name in [b.strip() for b in args.backbones.split(",") if b.strip()]:
        m = measure_full(name, args.subset, args.k, args.size, views, args.seed)
        same, lines = extrapolate(m, args.images, args.test_images, args.k, len(views),
                                  fold_sizes, epochs)
        upper, _ = extrapolate(m, args.images, args.test_images, args.k, len(views),
                               fold_sizes, budget)
        ratio = same / feat["seconds"]
        print(f"full trial, {name} (random weights, {m['trainable_params']:,} trainable): "
              f"measured {m['train_rate']:.0f} training patches/s over one epoch of "
              f"{m['train_patches']} patches, {m['predict_rate']:.0f} predicted patches/s; "
              "extrapolated per fold as E x (train/rate + val/rate) + final OOF+test over "
              f"{len(views)} views:")
        for line in lines:
            print(f"  {line}")
        print(f"  = {same:,.0f} s at the features trial's epochs ({upper:,.0f} s at the full "
              f"budget of {budget[0]} epochs); features trial is {ratio:,.0f}x cheaper"
              + (f" (target >= {TARGET_RATIO:.0f}x: "
                 f"{'met' if ratio >= TARGET_RATIO else 'NOT met'})"
                 if name == "efficientnet_b0" else ""))
        embed = (args.images + args.test_images) * args.k * len(fcv.train.views) \
            / m["predict_rate"]
        print(f"  one-off embedding cache for the features objective with {name}: "
              f"({args.images}+{args.test_images})x{args.k}x{len(fcv.train.views)} / "
              f"{m['predict_rate']:.0f} = {embed:,.0f} s, shared by every trial")
        result["full"][name] = {**m, "extrapolated_seconds": same, "budget_seconds": upper,
                                "ratio": ratio, "how": lines, "embedding_seconds": embed}
    if args.complete:
        name = args.backbones.split(",")[0].strip()
        with tempfile.TemporaryDirectory(prefix="kit-bench-tune-") as tmp:
            seconds = complete_full_trial(name, args, tmp)
        print(f"complete full trial, {name}: {seconds:,.0f} s measured "
              f"({seconds / feat['seconds']:,.0f}x the features trial)")
        result["full"][name]["complete_seconds"] = seconds
    atomic_write_json(paths.runs_dir / "bench" / "tune.json", result)
    print(f"written {paths.runs_dir / 'bench' / 'tune.json'}")
    return 0 if np.isfinite(feat["seconds"]) else 1
