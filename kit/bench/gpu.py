"""``./run.sh bench gpu``: the CUDA paths, exercised and timed on a real GPU.

For each backbone (default ``efficientnet_b0`` and ``phikon``, i.e. a Phikon-shaped
ViT-B/16; random weights, nothing to download):

1. **cv**: a short ``cv`` on generated tinted patches (:func:`kit.data.synth.write_patch_workdir`)
   on the pixel path, as a competitor runs it on a GPU: mixed precision (bf16 where the GPU
   has it natively, else fp16 with loss scaling), ``channels_last``, pinned memory and
   DataLoader workers (``train.yaml``'s ``auto`` settings). Seconds, patches/s, peak memory.
2. **agreement**: the same seed on the CPU and the GPU: one model, copied to both, trained
   the same few steps on the same batches (no augmentation, fp32, TF32 off), then its
   validation probabilities compared: max |p_cpu - p_gpu| <= ``--tol-fp32``. The GPU
   model's probabilities with AMP + ``channels_last`` (what cv predicts with) against the
   CPU's fp32 ones: <= ``--tol-amp``.
3. **train loop**: :func:`kit.bench.train.bench_backbone` on the GPU: an epoch of the kit's
   loop (memmap, augmentation in workers, pinned copies, CutMix, AMP step) against the bare
   step on batches already on the device.
4. **embedding**: :func:`kit.training.features.embed_array` (what builds the embedding cache)
   against the bare forward pass of the same backbone on the same batches already on the device.

Without CUDA it stops with one line (exit 2). ``--device cpu`` runs the same steps on the
CPU, to check the bench itself (the CPU-vs-device comparison is then CPU against CPU).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from kit.bench.gpu_report import format_agreement, format_cv, format_embed, format_train, markdown
from kit.bench.train import bench_backbone
from kit.config import train_settings
from kit.utils import KitError, atomic_write_json, seed_everything

log = logging.getLogger(__name__)

DEFAULT_BACKBONES = "efficientnet_b0,phikon"
# Tolerances on probabilities (0..1). fp32 on both sides differs only by the order of
# floating-point sums (cuDNN vs CPU kernels), amplified a little by a few optimiser steps.
# AMP rounds activations to 8 (bf16) or 11 (fp16) mantissa bits: logits move by ~1e-2.
TOL_FP32 = 5e-3
TOL_AMP = 5e-2


def add_arguments(parser):
    parser.add_argument("--backbones", default=DEFAULT_BACKBONES,
                        help=f"comma-separated backbones (default: {DEFAULT_BACKBONES}; phikon "
                             "with random weights is a Phikon-shaped ViT-B/16)")
    parser.add_argument("--device", default="cuda",
                        help="cuda | cuda:N (default: cuda); cpu only to check the bench itself")
    parser.add_argument("--images", type=int, default=96,
                        help="generated training images of the short cv (default: 96)")
    parser.add_argument("--top-k", type=int, default=8, help="patches per image (default: 8)")
    parser.add_argument("--size", type=int, default=128, help="patch side in px (default: 128)")
    parser.add_argument("--folds", type=int, default=2, help="cv folds (default: 2)")
    parser.add_argument("--epochs", type=int, default=2, help="cv epochs (default: 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--num-workers", default="auto",
                        help="DataLoader workers (default: auto = min(8, cores - 1) on CUDA)")
    parser.add_argument("--patches", type=int, default=2048,
                        help="patches per timed epoch / embedding pass (default: 2048)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes of each kind, alternating; the fastest counts")
    parser.add_argument("--check-steps", type=int, default=5,
                        help="same-seed training steps before comparing CPU and GPU (default: 5)")
    parser.add_argument("--check-images", type=int, default=8,
                        help="validation images compared on CPU and GPU (default: 8)")
    parser.add_argument("--tol-fp32", type=float, default=TOL_FP32,
                        help=f"max |p_cpu - p_gpu| in fp32 (default: {TOL_FP32:g})")
    parser.add_argument("--tol-amp", type=float, default=TOL_AMP,
                        help=f"max |p_cpu - p_gpu| with AMP (default: {TOL_AMP:g})")
    parser.add_argument("--skip", default="",
                        help="comma-separated steps to leave out: cv, agreement, train, embed")
    parser.add_argument("--json", dest="json_out", metavar="FILE",
                        help="also write every figure to this JSON file")


# --------------------------------------------------------------------------- device
def require_device(name: str):
    """The torch device to bench on; a KitError (exit 2) when CUDA is asked for and absent."""
    import torch

    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = (f"CUDA {torch.version.cuda} build" if torch.version.cuda
                     else "CPU-only build")
            raise KitError(f"bench gpu: no CUDA device here (torch {torch.__version__}, "
                           f"{build}); run it on a GPU machine, e.g. a Kaggle or Colab GPU "
                           "notebook (!an2dl-kit bench gpu)")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise KitError(f"bench gpu: --device {name}: only {torch.cuda.device_count()} "
                           "CUDA device(s) visible")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise KitError(f"bench gpu: --device {name}: use cuda, cuda:N or cpu")
    return dev


def describe_device(device) -> dict:
    """What the GPU is and which precision the kit's ``amp: auto`` picks on it."""
    import torch

    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "amp": amp_name(device, "auto")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1),
                    bf16_native=props.major >= 8)
        info["loss_scaling"] = info["amp"] == "fp16"
        note = precision_note(info["amp"], (props.major, props.minor))
        if note:
            info["warning"] = note
    return info


def precision_note(amp: str, capability: tuple[int, int]) -> str | None:
    """A warning when ``amp: auto`` picked a precision the GPU only emulates.

    bf16 tensor cores start at compute capability 8.0 (Ampere); older GPUs (Kaggle's and
    Colab's T4 is 7.5) run bf16 emulated and slowly, while ``torch.cuda.is_bf16_supported()``
    still answers True unless asked ``including_emulation=False``.
    """
    if amp == "bf16" and tuple(capability) < (8, 0):
        cap = ".".join(map(str, capability))
        return (f"amp auto picked bf16, which this GPU only emulates (compute capability {cap} "
                "< 8.0); fp16 with loss scaling is its native mixed precision (amp: fp16 in "
                "kit/conf/train.yaml, or in a cv --params file)")
    return None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def no_tf32():
    """Exact fp32 on the GPU (TF32 matmuls/convolutions round to 10 mantissa bits)."""
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------- comparison
def compare_probs(reference, other, tol: float) -> dict:
    """How far two probability arrays (same shape, rows sum to 1) are apart.

    Returns
    -------
    dict
        ``max_abs``, ``mean_abs`` (over every entry), ``argmax_agree`` (share of rows with
        the same top class), ``tol`` and ``ok`` (``max_abs <= tol``).
    """
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"compare_probs: shapes {a.shape} and {b.shape} differ or are empty")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return {"max_abs": float("nan"), "mean_abs": float("nan"), "argmax_agree": 0.0,
                "tol": float(tol), "ok": False}
    diff = np.abs(a - b)
    rows_a, rows_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    agree = float(np.mean(rows_a.argmax(1) == rows_b.argmax(1)))
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "argmax_agree": agree, "tol": float(tol), "ok": bool(diff.max() <= tol)}


def agreement(name: str, array, labels, cfg: dict, device, steps: int, n_check: int,
              seed: int, tol_fp32: float, tol_amp: float) -> dict:
    """Same seed, same batches, CPU vs ``device``: fp32 after ``steps`` steps, and AMP."""
    import torch

    from kit.training.build import build_model, set_train_mode
    from kit.training.loaders import PatchDataset, make_loader
    from kit.training.predict import predict
    from kit.training.train import Trainer

    cpu = torch.device("cpu")
    # Nothing random inside the steps: dropout masks would come from two different
    # generators (the CPU's and the GPU's), so the head's dropout is off here.
    fp32 = {**cfg, "amp": "off", "channels_last": False, "num_workers": 0,
            "augment": {**cfg["augment"], "cutmix_alpha": 0.0}, "label_smoothing": 0.0,
            "head": {**cfg["head"], "dropout": 0.0}}
    seed_everything(seed)
    model_cpu, _ = build_model(name, fp32, "random", patch_size=int(array.shape[2]))
    model_dev = copy.deepcopy(model_cpu)  # the same initial weights on both sides
    rows = np.arange(len(array))
    train_rows, val_rows = rows[n_check:], rows[:n_check]
    ds = PatchDataset(array, train_rows, labels[train_rows])  # no augmentation
    batches = []
    for xb, yb in make_loader(ds, fp32, seed, cpu, shuffle=False):
        if len(xb) >= 2:
            batches.append((xb, yb))
        if len(batches) == steps:
            break
    out = {}
    with no_tf32():
        for where, model, dev in (("cpu", model_cpu, cpu), ("device", model_dev, device)):
            trainer = Trainer(model, fp32, dev, labels[train_rows], max(1, len(batches)))
            set_train_mode(model)
            losses = [float(trainer.step(*trainer.prepare(xb, yb, mix=False)))
                      for xb, yb in batches]
            probs = predict(model, array, val_rows, ("id",), 2 * int(cfg["batch_size"]), dev,
                            amp="off", channels_last=False)["id"]
            out[where] = (losses, probs)
    _sync(device)
    amp = predict(model_dev, array, val_rows, ("id",), 2 * int(cfg["batch_size"]), device,
                  amp="auto", channels_last="auto")["id"]
    loss_diff = float(np.max(np.abs(np.subtract(out["cpu"][0], out["device"][0]))))
    return {"backbone": name, "steps": len(batches), "patches": int(len(val_rows) *
                                                                    array.shape[1]),
            "loss_max_abs": loss_diff,
            "fp32": compare_probs(out["cpu"][1], out["device"][1], tol_fp32),
            "amp": compare_probs(out["cpu"][1], amp, tol_amp)}


# --------------------------------------------------------------------------- cv
def short_cv(name: str, paths, cfg: dict, device, seed: int) -> dict:
    """``run_cv`` on the pixel path with the CUDA settings; time, throughput, memory."""
    import pandas as pd
    import torch

    from kit.data.patches import load_patches
    from kit.training.cv import run_cv
    from kit.training.device import n_workers

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    metrics = run_cv(paths, None, train_settings(cfg), backbone=name, seed=seed, weights="random",
                     params="none", device=str(device), feature_cache=False, restart=True)
    _sync(device)
    seconds = time.perf_counter() - t0
    folds = pd.read_csv(paths.folds_csv)
    k = int(load_patches(paths, "train").array.shape[1])
    n_folds = int(folds.fold.nunique())
    # Patches trained on (every fold trains on the others) over the epochs, as timed here.
    patches = (n_folds - 1) * len(folds) * k * int(cfg["epochs"])
    return {"backbone": name, "seconds": seconds, "oof_macro_f1": metrics["oof_macro_f1"],
            "train_patches": patches,
            "patches_per_s": patches / seconds,  # whole cv, predictions too
            "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                             if device.type == "cuda" else None),
            "amp": amp_name(device, cfg["amp"]),
            "channels_last": str(cfg["channels_last"]) == "true" or (
                str(cfg["channels_last"]) == "auto" and device.type == "cuda"),
            "num_workers": n_workers(cfg["num_workers"], device),
            "trainable": metrics.get("trainable_params")}


def amp_name(device, amp) -> str:
    """``off``, ``bf16`` or ``fp16``: what ``amp`` resolves to on ``device``."""
    import torch

    from kit.training.device import amp_dtype

    return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype(device, amp)]


def speed_cache(folder: Path, labels, k: int, size: int, seed: int) -> np.ndarray:
    """Generated patches on disk, memory-mapped as cv and the embedding cache read them."""
    from kit.data.synth import tinted_patches

    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "patches.npy", tinted_patches(len(labels), k, size, labels, seed))
    return np.load(folder / "patches.npy", mmap_mode="r")


# --------------------------------------------------------------------------- embedding
def embed_throughput(name: str, array, batch_size: int, device, repeats: int) -> dict:
    """:func:`kit.training.features.embed_array` vs the bare forward pass on the same batches."""
    import torch

    from kit.models.backbones import create_backbone
    from kit.models.normalize import normalize_batch
    from kit.training.features import embed_array

    bb = create_backbone(name, weights="random", patch_size=int(array.shape[2]))
    bb.eval().to(device)
    n, k = array.shape[:2]
    per_chunk = max(1, int(batch_size) // k)
    batches = [normalize_batch(torch.from_numpy(np.array(array[a:a + per_chunk]))
                               .reshape(-1, *array.shape[2:]).to(device),
                               bb.mean, bb.std, bb.input_size)
               for a in range(0, n, per_chunk)]
    out = np.zeros((n, k, 1, bb.num_features), np.float32)

    def bare():
        with torch.inference_mode():
            for x in batches:
                bb(x)

    def bare_amp():
        from kit.training.device import amp_dtype

        dtype = amp_dtype(device, "auto")
        ctx = (torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None
               else contextlib.nullcontext())
        with torch.inference_mode(), ctx:
            for x in batches:
                bb(x.contiguous(memory_format=torch.channels_last)
                   if device.type == "cuda" else x)

    def kit():
        embed_array(bb, array, ("id",), out, batch_size, device, desc=f"embed {name}")

    def kit_amp():  # what the cache does with features.amp: auto
        embed_array(bb, array, ("id",), out, batch_size, device, desc=f"embed {name}",
                    amp="auto")

    bare()  # warm-up: kernels, allocator, cuDNN autotuning
    times = {"kit": [], "bare": [], "bare_amp": [], "kit_amp": []}
    for _ in range(max(1, repeats)):
        for kind, fn in (("bare", bare), ("kit", kit), ("bare_amp", bare_amp),
                         ("kit_amp", kit_amp)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[kind].append(time.perf_counter() - t0)
    best = {kind: min(v) for kind, v in times.items()}
    total = n * k
    return {"backbone": name, "patches": total, "kit_ips": total / best["kit"],
            "bare_ips": total / best["bare"], "bare_amp_ips": total / best["bare_amp"],
            "kit_amp_ips": total / best["kit_amp"],
            "ratio": best["bare"] / best["kit"]}  # kit speed as a share of the bare pass


# --------------------------------------------------------------------------- run
STEPS = ("cv", "agreement", "train", "embed")


def run(args) -> int:
    import torch

    from kit.data.patches import load_patches
    from kit.data.synth import write_patch_workdir
    from kit.training.settings import train_config

    device = require_device(args.device)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(STEPS)
    if unknown:
        raise KitError(f"bench gpu: --skip {', '.join(sorted(unknown))}: unknown step; "
                       f"steps: {', '.join(STEPS)}")
    names = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if not names:
        raise KitError("bench gpu: --backbones is empty")
    if args.images < 2 * args.folds or args.check_images >= args.images:
        raise KitError(f"bench gpu: --images {args.images} must be at least 2 x --folds and "
                       "more than --check-images")
    info = describe_device(device)
    print(f"bench gpu: {info.get('name', device)} (capability {info.get('capability', '-')}, "
          f"{info.get('memory_gib', '-')} GiB), torch {info['torch']}, CUDA {info['cuda']}, "
          f"cuDNN {info['cudnn']}; kit amp auto -> {info['amp']}"
          f"{' with loss scaling' if info.get('loss_scaling') else ''}")
    if device.type == "cpu":
        print("bench gpu: --device cpu checks the bench itself; these are not GPU figures")
    if info.get("warning"):
        log.warning(f"bench gpu: warning: {info['warning']}")
    cfg = train_config(train_settings({"batch_size": args.batch_size,
                                       "num_workers": args.num_workers,
                                       "epochs": args.epochs, "patience": 0, "amp": "auto",
                                       "channels_last": "auto"}))
    results: dict[str, list] = {s: [] for s in STEPS}
    failed = []
    with tempfile.TemporaryDirectory(prefix="kit-bench-gpu-") as tmp:
        tmp = Path(tmp)
        paths = write_patch_workdir(tmp / "work", n_train=args.images, n_test=16, k=args.top_k,
                                    size=args.size, n_folds=args.folds, seed=args.seed)
        train = load_patches(paths, "train").array
        labels = np.arange(args.images) % 4  # write_patch_workdir's training labels
        n_images = math.ceil(args.patches / args.top_k)
        speed = speed_cache(tmp / "speed", np.arange(n_images) % 4, args.top_k, args.size,
                            args.seed)
        for name in names:
            if "cv" not in skip:
                cv_cfg = {k: cfg[k] for k in ("batch_size", "num_workers", "epochs",
                                               "patience", "amp", "channels_last")}
                r = short_cv(name, paths, cv_cfg, device, args.seed)
                results["cv"].append(r)
                print(format_cv(r), flush=True)
            if "agreement" not in skip:
                r = agreement(name, train, labels, cfg, device, args.check_steps,
                              args.check_images, args.seed, args.tol_fp32, args.tol_amp)
                results["agreement"].append(r)
                print(format_agreement(r), flush=True)
                if not (r["fp32"]["ok"] and r["amp"]["ok"]):
                    failed.append(name)
            if "train" not in skip:
                r = bench_backbone(name, speed, np.arange(n_images) % 4, cfg, device,
                                   args.repeats, args.seed)
                results["train"].append(r)
                print(format_train(r), flush=True)
            if "embed" not in skip:
                r = embed_throughput(name, speed, args.batch_size, device, args.repeats)
                results["embed"].append(r)
                print(format_embed(r, device.type), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(markdown(info, results))
    if args.json_out:
        atomic_write_json(args.json_out, {"device": info, "results": results,
                                          "args": {k: v for k, v in vars(args).items()
                                                   if not k.startswith("_")
                                                   and not callable(v)}})
        print(f"bench gpu: figures -> {args.json_out}")
    if failed:
        raise KitError(f"bench gpu: CPU and {device} probabilities disagree beyond the "
                       f"tolerance for {', '.join(failed)} (see the lines above)")
    return 0
