"""``./run.sh bench regions``: windows spread over mask regions (``patches.select: per_region``)
against the K windows of most mask coverage (``top_k``, the default), on held-back test labels.

On each independently generated set (:mod:`kit.data.synth`: masks of one to four blob regions,
the class inside them), the data stages run once; the ``per_region`` arm gets its own work
directory with the same folds (``folds/`` copied) and its own patch cache, so the two arms
differ in the windows only. Both train ``bench noise``'s baseline: ``tiny_cnn`` pretrained by
the kit on a second generated set, frozen, a head on its cached embeddings
(:func:`kit.bench.honesty.build_standin`), in the ``easy`` and ``hard`` label-noise regimes of
``bench noise``.

Per arm and regime, over seeds: test macro F1 (held-back labels), OOF macro F1, OOF - test,
and for ``per_region`` the test difference from ``top_k`` on the same set with a paired
bootstrap interval per seed and a pooled one for the mean
(:func:`kit.bench.noise_summary.pooled_ci`).
As a diagnostic of what the windows show: the share of each training image's mask regions of
at least ``min_region_px`` pixels that hold a window, and the mean number of regions with one.

Everything is kept under ``runs/bench/regions/<preset>/`` (data and stages reused while their
inputs match; cv always retrained); results go to ``results.json`` there.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

from kit import PROB_COLUMNS
from kit.bench.heldout import (
    cpu_seconds,
    generated_data_arguments,
    heldout_labels,
    mean_of,
    num,
    parse_names,
    per_seed_line,
    prepare_seed,
    preset_and_seeds,
    read_table,
    warm_up,
)
from kit.bench.honesty import build_standin
from kit.bench.noise import EASY_NOISE, FROZEN, REGIMES, SIGNAL, Preset, regime_arguments
from kit.bench.noise_summary import ci_text, pooled_ci
from kit.config import load_config, train_settings
from kit.paths import Paths
from kit.utils import atomic_write_json, progress

# Torch, the stages, the metrics and numpy are imported in the functions that use them: a
# bench module is imported to build its --help (kit/bench/__init__.py).

BACKBONE = "tiny_cnn"
BASELINE = "top_k"
ARMS = (BASELINE, "per_region")


def _presets() -> dict:
    from kit.data import synth

    quick_data = dict(n_train=100, n_test=120, short_side=160, long_side_max=320, signal=SIGNAL)
    mid = synth.preset("v2", short_side=256, long_side_max=512, signal=SIGNAL)
    stand_in = {"epochs": 12, "patience": 0, "lr": 3e-3}
    return {
        # bench noise's quick sets and stand-in: minutes on a 2-core CPU; checks the bench
        "quick": Preset("quick", data=quick_data,
                        standin_data={**quick_data, "n_train": 160, "n_test": 4,
                                      "label_noise": EASY_NOISE},
                        patches={"size": 48, "stride": 24, "top_k": 6}, folds={"n_splits": 3},
                        train={"inner_folds": 3}, standin=stand_in),
        # bench noise's standard: the v2 counts (691/477) on 256 px scans, 64 px windows, 12
        # a image, 5 folds: the real data's sample sizes (an hour or more on a 2-core CPU)
        "standard": Preset("standard", data=mid,
                           standin_data={**mid, "n_test": 8, "label_noise": EASY_NOISE},
                           patches={"size": 64, "stride": 32, "top_k": 12}, standin=stand_in),
    }


def add_arguments(parser):
    generated_data_arguments(parser, "regions")
    parser.add_argument("--preset", choices=tuple(_presets()), default="quick",
                        help="quick: 100/120 small scans, 3 folds (minutes on a CPU); standard: "
                             "the v2 counts (691/477) on 256 px scans, 5 folds (an hour or more) "
                             "(default: quick)")
    regime_arguments(parser)
    parser.add_argument("--min-region-px", type=int, default=None, dest="min_region_px",
                        help="per_region's least region area in pixels (default: patches.yaml's)")


def run(args) -> int:
    preset, seeds = preset_and_seeds(args, _presets()[args.preset], "regions")
    if args.min_region_px is not None:
        preset = replace(preset, patches={**preset.patches, "min_region_px": args.min_region_px})
    result = run_regions(Paths.from_root(getattr(args, "workdir", None)), preset, seeds,
                         regimes=parse_names(args.regimes, REGIMES, "--regimes"),
                         device=args.device)
    print(format_table(result))
    print(f"written {result['results_json']}")
    return 0


# --------------------------------------------------------------------------- the harness
def run_regions(paths: Paths, preset, seeds, regimes=REGIMES, device=None) -> dict:
    """Both arms on each regime and seed: OOF and test macro F1, the paired test difference
    and the regions the windows cover; also written to ``results.json``.

    Parameters
    ----------
    paths : kit.paths.Paths
        Its ``runs/bench/regions/<preset>/`` holds the data, work directories and results.
    preset : kit.bench.noise.Preset
    seeds : list of int
    regimes : sequence of str
        Of :data:`REGIMES`.
    """
    root = paths.runs_dir / "bench" / "regions" / preset.name
    t_start = time.perf_counter()
    standin = build_standin(root / "standin", preset.regime("easy"), seeds[0], device)
    runs, data_info = [], {}

    def result(complete: bool) -> dict:
        return {"preset": preset.name, "seeds": list(seeds), "regimes": list(regimes),
                "arms": list(ARMS), "backbone": BACKBONE, "standin": standin,
                "data": data_info, "complete": complete,
                "settings": {"data": preset.data, "noise": preset.noise,
                             "standin_data": preset.standin_data, "patches": preset.patches,
                             "folds": preset.folds, "train": {**FROZEN, **preset.train}},
                "runs": runs, "summary": summarise(runs, regimes),
                "seconds": round(time.perf_counter() - t_start, 1),
                "results_json": str(root / "results.json")}

    jobs = [(regime, seed) for regime in regimes for seed in seeds]
    for regime, seed in progress(jobs, desc="bench regions", unit="set"):
        folder = root / regime / f"seed{seed}"
        hpreset = preset.regime(regime)
        data, top_paths, info = prepare_seed(folder, hpreset, seed)
        region_paths = per_region_workdir(folder / "per_region", data, top_paths, preset)
        data_info[f"{regime}/{seed}"] = info
        truth = heldout_labels(data)
        warm_up(top_paths, device)
        for arm, arm_paths in ((BASELINE, top_paths), ("per_region", region_paths)):
            rec = score_arm(arm, regime, arm_paths, data, truth, preset, seed, standin, device)
            if arm != BASELINE:
                rec["vs_top_k"] = compare(top_paths, arm_paths, truth)
            runs.append(rec)
            atomic_write_json(root / "results.json", result(False))
    out = result(True)
    atomic_write_json(root / "results.json", out)
    return out


def patches_config(preset, select: str) -> dict:
    """The resolved patches.yaml of an arm: the preset's windows, chosen by ``select``."""
    return load_config("patches", {**preset.patches, "select": select})


def per_region_workdir(folder: Path, data, top_paths, preset):
    """The per_region arm's work directory: ``top_paths``' folds and clean list (``folds/``
    copied, so both arms train and score the same images in the same folds) and a per_region
    patch cache (reused while its key matches)."""
    from kit.data.patches import run_patches

    paths = Paths.from_root(Path(folder) / "work")
    shutil.copytree(top_paths.folds_dir, paths.folds_dir, dirs_exist_ok=True)
    run_patches(paths, data, patches_config(preset, "per_region"))
    return paths


def score_arm(arm: str, regime: str, paths, data, truth: dict, preset, seed: int,
              standin: dict, device=None) -> dict:
    """One cv run of the frozen stand-in on ``paths``' patches: OOF and test macro F1, OOF - test
    and the regions its training windows cover."""
    from kit.metrics import bootstrap_ci, macro_f1
    from kit.training.cv import run_cv

    t0, c0 = time.perf_counter(), cpu_seconds()
    metrics = run_cv(paths, None, train_settings({**FROZEN, **preset.train}), backbone=BACKBONE,
                     seed=seed, weights=standin["file"], params="none", restart=True, device=device)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    test = read_table(paths.backbone_dir(BACKBONE) / "test.csv")
    probs = test[list(PROB_COLUMNS)].to_numpy()
    y_test = [truth[s] for s in test.sample_index]
    test_f1, oof = macro_f1(y_test, probs), float(metrics["oof_macro_f1"])
    cfg = patches_config(preset, arm)
    return {"regime": regime, "seed": seed, "arm": arm, "oof": oof,
            "oof_ci95": metrics.get("oof_macro_f1_ci95"), "test": test_f1,
            "test_ci95": list(bootstrap_ci(y_test, probs)), "gap": oof - test_f1,
            "n_oof": metrics.get("n_oof"), "n_test": len(test),
            "patch_keys": metrics.get("patch_keys"),
            "coverage": region_coverage(paths, data, int(cfg["size"]), int(cfg["min_region_px"])),
            "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}


def region_coverage(paths, data, size: int, min_px: int) -> dict:
    """What the training windows show: per image, the share of its mask regions of at least
    ``min_px`` pixels (the largest when none is) that hold a window, and the number of
    distinct regions with one; means over the images with a mask."""
    import numpy as np

    from kit.data.dataset import read_mask
    from kit.data.patches import load_patches
    from kit.data.regions import label_regions

    ps = load_patches(paths, "train", size)
    shares, counts = [], []
    for sample_index, rows in ps.index.groupby("sample_index", sort=False):
        _, areas = label_regions(read_mask(Path(data) / "train_data" /
                                           sample_index.replace("img_", "mask_")))
        if len(areas) == 0:
            continue
        eligible = set((np.flatnonzero(areas >= min_px) + 1).tolist()) or \
            {int(np.argmax(areas)) + 1}
        shown = set(int(r) for r in rows.region) - {0}
        shares.append(len(eligible & shown) / len(eligible))
        counts.append(len(shown))
    return {"share_covered": float(np.mean(shares)) if shares else math.nan,
            "regions_shown": float(np.mean(counts)) if counts else math.nan,
            "images": len(shares)}


def compare(top_paths, region_paths, truth: dict) -> dict:
    """Paired bootstrap of per_region's test macro F1 minus top_k's on the same test images."""
    from kit.metrics import paired_bootstrap

    a = read_table(top_paths.backbone_dir(BACKBONE) / "test.csv").set_index("sample_index")
    b = read_table(region_paths.backbone_dir(BACKBONE) / "test.csv").set_index("sample_index")
    ids = list(a.index)
    res = paired_bootstrap([truth[s] for s in ids], a.loc[ids, list(PROB_COLUMNS)].to_numpy(),
                           b.loc[ids, list(PROB_COLUMNS)].to_numpy())
    return {"diff": res["diff"], "ci95": res["ci95"], "p_better": res["p_b_better"]}


# --------------------------------------------------------------------------- summary
def summarise(runs: list[dict], regimes) -> list[dict]:
    """One row per regime x arm, over seeds: means and per-seed values; for per_region the
    difference from top_k with per-seed and pooled 95 % intervals."""
    rows = []
    for regime in regimes:
        for arm in ARMS:
            sel = [r for r in runs if r["regime"] == regime and r["arm"] == arm]
            if not sel:
                continue
            vs = [r["vs_top_k"] for r in sel if "vs_top_k" in r]
            diffs = [v["diff"] for v in vs]
            rows.append({
                "regime": regime, "arm": arm, "n": len(sel), "seeds": [r["seed"] for r in sel],
                "test": mean_of(r["test"] for r in sel), "oof": mean_of(r["oof"] for r in sel),
                "gap": mean_of(r["gap"] for r in sel),
                "per_seed_test": [r["test"] for r in sel], "per_seed_oof": [r["oof"] for r in sel],
                "diff": mean_of(diffs) if diffs else math.nan, "per_seed_diff": diffs,
                "per_seed_ci95": [v["ci95"] for v in vs],
                "diff_ci95": pooled_ci(diffs, [v["ci95"] for v in vs]) if diffs
                else [math.nan, math.nan],
                "share_covered": mean_of(r["coverage"]["share_covered"] for r in sel),
                "regions_shown": mean_of(r["coverage"]["regions_shown"] for r in sel),
                "wall_seconds": mean_of(r["wall_seconds"] for r in sel)})
    return rows


def format_table(result: dict) -> str:
    """The summary as text: one block per regime."""
    seeds = result["seeds"]
    lines = [f"bench regions ({result['preset']}): {BACKBONE} stand-in, frozen, heads on cached "
             f"embeddings; {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), "
             f"{result['seconds']:.0f} s in all",
             "  test = macro F1 on the held-back test labels; OOF = out-of-fold macro F1; means "
             "over seeds; d test = per_region - top_k on the same set, CI = paired bootstrap "
             "95 % per seed, pooled = of the mean",
             "  covered = share of each training image's mask regions >= min_region_px holding a "
             "window; shown = regions with a window per image"]
    for regime in result["regimes"]:
        rows = [r for r in result["summary"] if r["regime"] == regime]
        if not rows:
            continue
        lines.append(f"  {regime}: label_noise {result['settings']['noise'][regime]}")
        lines.append(f"    {'arm':<11}{'test':>7}{'OOF':>7}{'OOF-test':>9}{'d test':>8}"
                     f"{'pooled CI':>17}{'covered':>9}{'shown':>7}{'wall s':>8}  per-seed d [CI]")
        for r in rows:
            per = "; ".join(f"{d:+.3f} [{c[0]:+.2f},{c[1]:+.2f}]"
                            for d, c in zip(r["per_seed_diff"], r["per_seed_ci95"]))
            lines.append(f"    {r['arm']:<11}{num(r['test'], '.3f'):>7}{num(r['oof'], '.3f'):>7}"
                         f"{num(r['gap'], '+.3f'):>9}{num(r['diff'], '+.3f'):>8}"
                         f"{ci_text(r['diff_ci95']):>17}{num(r['share_covered'], '.0%'):>9}"
                         f"{num(r['regions_shown'], '.2f'):>7}{num(r['wall_seconds'], '.0f'):>8}"
                         f"  {per}")
        lines.append(per_seed_line(rows))
    if result.get("standin"):
        s = result["standin"]
        lines.append(f"  stand-in backbone {s['file']} (fold 0 OOF macro F1 "
                     f"{s['fold0_macro_f1']:.3f} on its own set)")
    return "\n".join(lines)
