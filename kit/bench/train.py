"""``./run.sh bench train``: does the data path keep up with the model?

For each backbone (random weights, frozen as in training), one training epoch of the kit's
loop -- patches read from a memory-mapped cache, albumentations, collation, normalisation on
the device, CutMix, forward, backward, optimiser step -- is timed against the bare
forward/backward/step of the same model on batches already normalised and on the device,
alternating the two so that both see the same machine load. The data path alone (reading
and augmenting, no model) is timed too. Target: kit loop <= 1.15 x bare on efficientnet_b0.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np

from kit.config import train_settings
from kit.utils import KitError, seed_everything

TARGET = 1.15
TARGET_BACKBONE = "efficientnet_b0"


def add_arguments(parser):
    parser.add_argument("--backbones", default="tiny_cnn,efficientnet_b0",
                        help="comma-separated backbones (default: tiny_cnn,efficientnet_b0)")
    parser.add_argument("--patches", type=int, default=384,
                        help="training patches per timed epoch (default: 384)")
    parser.add_argument("--size", type=int, default=128, help="patch side in px (default: 128)")
    parser.add_argument("--top-k", type=int, default=12, help="patches per image (default: 12)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--num-workers", default=None,
                        help="DataLoader workers (default: train.yaml's num_workers)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed epochs of each kind, alternating; the fastest counts")
    parser.add_argument("--device", choices=("cpu", "cuda", "mps"), default=None)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _cache(folder: Path, labels, k: int, size: int, seed: int) -> np.ndarray:
    """A generated patch cache (kit.data.synth) on disk, memory-mapped as cv reads the real one."""
    from kit.data.synth import tinted_patches

    np.save(folder / "patches.npy", tinted_patches(len(labels), k, size, labels, seed))
    return np.load(folder / "patches.npy", mmap_mode="r")


def bench_backbone(name: str, array, labels, cfg: dict, device, repeats: int, seed: int) -> dict:
    """Seconds per epoch of the kit loop, the bare step and the data path alone (best of)."""

    from kit.training.augment import build_train_transform
    from kit.training.build import build_model, set_train_mode
    from kit.training.loaders import PatchDataset, make_loader
    from kit.training.train import Trainer

    seed_everything(seed)
    model, n_trainable = build_model(name, cfg, "random", patch_size=int(array.shape[2]))
    ds = PatchDataset(array, np.arange(len(array)), labels,
                      build_train_transform(cfg["augment"], seed=seed))
    loader = make_loader(ds, cfg, seed, device)
    trainer = Trainer(model, cfg, device, labels, len(loader))
    # The bare step's batches: the same patches, normalised and on the device beforehand.
    bare = [trainer.prepare(xb, yb, mix=False) for xb, yb in make_loader(
        PatchDataset(array, np.arange(len(array)), labels), cfg, seed, device, shuffle=False)]

    def bare_epoch():
        set_train_mode(model)
        for x, t in bare:
            trainer.step(x, t)

    def kit_epoch():
        trainer.epoch(loader, desc=f"{name} kit loop")

    def data_epoch():
        for xb, yb in loader:
            trainer.prepare(xb, yb)

    for x, t in bare[:2]:  # warm-up: allocator, kernels, first-touch of the cache
        trainer.step(x, t)
    times = {"kit": [], "bare": [], "data": []}
    for _ in range(max(1, repeats)):
        for kind, fn in (("bare", bare_epoch), ("kit", kit_epoch), ("data", data_epoch)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[kind].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    n = sum(len(x) for x, _ in bare)
    return {"backbone": name, "patches": n, "trainable": n_trainable,
            "kit_s": best["kit"], "bare_s": best["bare"], "data_s": best["data"],
            "ratio": best["kit"] / best["bare"], "kit_ips": n / best["kit"],
            "bare_ips": n / best["bare"], "data_ips": n / best["data"],
            "workers": loader.num_workers,
            "median_ratio": float(np.median(times["kit"]) / np.median(times["bare"]))}


def run(args) -> int:
    import torch

    from kit.training.device import pick_device
    from kit.training.settings import train_config

    device = pick_device(args.device)
    overrides = {"batch_size": args.batch_size}
    if args.num_workers is not None:
        overrides["num_workers"] = args.num_workers
    cfg = train_config(train_settings(overrides))
    names = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if args.patches < 2 * args.batch_size:
        raise KitError(f"bench train: --patches must be at least 2 x --batch-size "
                       f"({2 * args.batch_size})")
    n_images = math.ceil(args.patches / args.top_k)
    labels = np.arange(n_images) % 4
    print(f"bench train: {n_images} images x {args.top_k} patches of {args.size} px, batch "
          f"{args.batch_size}, device {device}, {torch.get_num_threads()} torch threads, "
          f"best of {args.repeats}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kit-bench-") as tmp:
        array = _cache(Path(tmp), labels, args.top_k, args.size, args.seed)
        for name in names:
            r = bench_backbone(name, array, labels, cfg, device, args.repeats, args.seed)
            rows.append(r)
            print(f"{name:<16} kit loop {r['kit_s']:6.2f} s ({r['kit_ips']:7.1f} img/s)  "
                  f"bare step {r['bare_s']:6.2f} s ({r['bare_ips']:7.1f} img/s)  "
                  f"ratio {r['ratio']:.2f}x (medians {r['median_ratio']:.2f}x)  "
                  f"data path alone {r['data_ips']:7.1f} img/s  "
                  f"[{r['workers']} workers, {r['trainable']:,} trainable]")
    for r in rows:
        if r["backbone"] == TARGET_BACKBONE:
            verdict = "met" if r["ratio"] <= TARGET else "NOT met"
            print(f"target kit loop <= {TARGET:.2f}x bare step on {TARGET_BACKBONE}: {verdict} "
                  f"({r['ratio']:.2f}x)")
    return 0
