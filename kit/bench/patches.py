"""``./run.sh bench patches``: patch extraction against plain PNG decoding of the same files.

Both passes run in the same process with the same worker count over the same files (page
cache warmed first): the decode-only pass opens and fully decodes each image and mask with
Pillow and nothing else, the floor any extraction must pay; the extraction pass is the real
``kit.data.patches.build_split`` (decode, window scoring, cropping, streaming to ``patches.npy``).
Each pass runs ``--repeat`` times, alternating, and the fastest of each is compared.
Results are printed and written to ``runs/bench/patches.json``. Target: ratio <= 1.3.
"""
from __future__ import annotations

import resource
import shutil
import time

from kit.config import load_config
from kit.paths import Paths
from kit.utils import atomic_write_json, n_workers

TARGET_RATIO = 1.3


def add_arguments(parser):
    parser.set_defaults(data=None)  # no --data: generate a benchmark dataset
    for action in parser._actions:
        if action.dest == "data":
            action.help = ("dataset root to time (default: a dataset generated once under "
                           "runs/bench/ at the real data's image size)")
    parser.add_argument("--n-train", type=int, default=48,
                        help="generated training images when --data is not given (default: 48)")
    parser.add_argument("--n-test", type=int, default=16,
                        help="generated test images when --data is not given (default: 16)")
    parser.add_argument("--short-side", type=int, default=1024,
                        help="generated images' short side in px (default: 1024, as the real data)")
    parser.add_argument("--long-side-max", type=int, default=4200,
                        help="cap on the generated long side, 1.5-4x the short side "
                             "(default: 4200, as in the real training set)")
    parser.add_argument("--generator", choices=("demo", "plain"), default="demo",
                        help="demo: kit.data.synth's scans (textured, larger PNGs than the real "
                             "ones); plain: kit.data.synth's plain style, "
                             "flat background and smaller PNGs than the real ~0.7 MB, so "
                             "decoding is cheaper and the ratio harder (default: demo)")
    parser.add_argument("--limit", type=int, default=0,
                        help="use only the first N image/mask pairs (default: all)")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes for both passes; 0 = one per available core (default)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="timed passes of each kind, alternating; the fastest counts "
                             "(default: 2)")
    parser.add_argument("--size", type=int, help="patch side (default: kit/conf/patches.yaml)")
    parser.add_argument("--stride", type=int, help="window step (default: kit/conf/patches.yaml)")
    parser.add_argument("--top-k", type=int, dest="top_k",
                        help="patches per image (default: kit/conf/patches.yaml)")


def run(args) -> int:
    from kit.data.dataset import load_dataset

    paths = Paths.from_root(args.workdir)
    bench_dir = paths.runs_dir / "bench"
    root = args.data or _bench_dataset(bench_dir, args)
    ds = load_dataset(root)
    samples = ds.train + ds.test
    if args.limit:
        samples = samples[: args.limit]
    cfg = load_config("patches", {"size": args.size, "stride": args.stride, "top_k": args.top_k})
    workers = n_workers(args.workers)
    result = measure(samples, cfg, workers, bench_dir / "patches", max(1, args.repeat))
    result["dataset"] = str(ds.root)
    result["generator"] = None if args.data else args.generator
    result["mean_png_mb"] = sum(s.image.stat().st_size for s in samples) / len(samples) / 1e6
    _print(result)
    atomic_write_json(bench_dir / "patches.json", result)
    print(f"written {bench_dir / 'patches.json'}")
    return 0


def measure(samples, cfg: dict, workers: int, out_dir, repeat: int = 2) -> dict:
    """Time decode-only and extraction passes over ``samples``; return the numbers."""
    from PIL import Image

    from kit.data.patches import build_split, cache_key, imap_ordered

    pixels = 0
    for s in samples:
        with Image.open(s.image) as im:
            pixels += im.size[0] * im.size[1]
    # Hashing reads every file once: it warms the page cache for both passes and is the
    # cost of a cache-hit rerun.
    t = time.perf_counter()
    cache_key(samples, cfg, "bench", workers)
    hash_s = time.perf_counter() - t
    tasks = [(s.image, s.mask) for s in samples]
    decode, extract = [], []
    for _ in range(repeat):
        decode.append(_timed(lambda: sum(imap_ordered(decode_file, tasks, workers))))
        stats: dict = {}
        extract.append(_timed(lambda: build_split(
            samples, out_dir, cfg, workers, desc="bench extract",
            stats=stats)))  # noqa: B023 (_timed calls it in this pass)
        extract[-1]["split"] = stats
    best_d = min(decode, key=lambda r: r["wall"])
    best_e = min(extract, key=lambda r: r["wall"])
    n = len(samples)
    return {
        "images": n, "megapixels": pixels / 1e6, "workers": workers, "cores": _cores(),
        "patch": {k: cfg[k] for k in ("size", "stride", "top_k")}, "repeat": repeat,
        "hash_s": hash_s,
        "decode_only": {**best_d, "images_per_s": n / best_d["wall"]},
        "extraction": {**best_e, "images_per_s": n / best_e["wall"]},
        "ratio": best_e["wall"] / best_d["wall"], "target_ratio": TARGET_RATIO,
        # CPU seconds are steadier than wall time on a shared machine
        "cpu_ratio": best_e["cpu"] / best_d["cpu"],
        "all_walls": {"decode_only": [r["wall"] for r in decode],
                      "extraction": [r["wall"] for r in extract]},
        "peak_rss_mb": _peak_rss_mb(),
    }


def decode_file(task):
    """Decode one image/mask pair and nothing else (the floor of extraction); returns seconds."""
    from PIL import Image

    image_path, mask_path = task[:2]
    t0 = time.perf_counter()
    with Image.open(mask_path) as mk, Image.open(image_path) as im:
        mk.load()
        im.load()
    return time.perf_counter() - t0


def _timed(fn) -> dict:
    """Wall time of ``fn()`` and the CPU time it used in this process and its children."""
    before = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    after = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum((a.ru_utime + a.ru_stime) - (b.ru_utime + b.ru_stime)
              for a, b in zip(after, before))
    return {"wall": wall, "cpu": cpu, "cpu_busy": cpu / (wall * _cores())}


def _cores() -> int:
    return n_workers(0)


def _peak_rss_mb() -> dict:
    # ru_maxrss is in KiB on Linux; children = the largest worker reaped so far.
    return {"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "largest_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _print(r: dict) -> None:
    d, e = r["decode_only"], r["extraction"]
    p = r["patch"]
    print(f"bench patches: {r['images']} images, {r['megapixels']:.0f} MP "
          f"({r['megapixels'] / r['images']:.1f} MP/image, PNG {r['mean_png_mb']:.1f} MB/image), "
          f"{r['workers']} workers on "
          f"{r['cores']} cores, P={p['size']} S={p['stride']} K={p['top_k']}, "
          f"best of {r['repeat']}")
    print(f"  {'pass':<14}{'wall s':>8}{'images/s':>10}{'MP/s':>8}{'cpu busy':>10}")
    for name, x in (("decode only", d), ("extraction", e)):
        print(f"  {name:<14}{x['wall']:>8.2f}{x['images_per_s']:>10.1f}"
              f"{r['megapixels'] / x['wall']:>8.1f}{x['cpu_busy']:>9.0%}")
    verdict = "meets" if r["ratio"] <= r["target_ratio"] else "MISSES"
    print(f"  ratio extraction / decode-only: {r['ratio']:.2f} wall ({verdict} the target "
          f"<= {r['target_ratio']}), {r['cpu_ratio']:.2f} in CPU seconds")
    split = e["split"]
    worker_total = split["decode"] + split["score"] + split["crop"]
    parts = ", ".join(f"{k} {split[k]:.2f} s ({split[k] / worker_total:.0%})"
                      for k in ("decode", "score", "crop"))
    print(f"  extraction time in workers: {parts}; write in main {split['write']:.2f} s")
    print(f"  cache key hashing (a cache-hit rerun): {r['hash_s']:.2f} s")
    m = r["peak_rss_mb"]
    print(f"  peak memory (ru_maxrss): main {m['main']:.0f} MB, "
          f"largest worker {m['largest_worker']:.0f} MB")


# --------------------------------------------------------------------------- data
def _bench_dataset(bench_dir, args):
    """A generated dataset (kit.data.synth) at the real data's scale, reused while its arguments
    match."""
    from kit.data import synth

    root = bench_dir / (f"data-{args.generator}-{args.n_train}-{args.n_test}-"
                        f"{args.short_side}-{args.long_side_max}-seed{args.seed}")
    if (root / ".complete").exists() and not (root / synth.META_JSON).exists():
        shutil.rmtree(root)  # this bench's own folder from before kit.data.synth: regenerate it
    print(f"benchmark dataset: {root} (generated once, reused while its arguments match)")
    # "plain": flat background and noisy flat strips, smaller PNGs than the textured scans
    return synth.generate(root, n_train=args.n_train, n_test=args.n_test,
                          short_side=args.short_side, seed=args.seed,
                          long_side_max=args.long_side_max,
                          style="plain" if args.generator == "plain" else "scan")
