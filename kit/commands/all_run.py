"""``./run.sh all``'s stages: what it plans, runs, skips and records for one list of runs
(``./run.sh all`` and ``./run.sh demo`` both call :func:`run_all`). Each stage's stamp, the
hash of what it depends on, is kept in ``runs/all_state.json`` once the stage has finished;
a stage whose stamp is unchanged is skipped, and cv resumes fold by fold on its own.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

from kit.config import load_config
from kit.utils import atomic_write_json


@dataclass
class AllOptions:
    """What ``all`` does besides the runs: ``tune`` trials per run (a run's own
    :attr:`RunSpec.tune` wins), the submission's ``name``, the ``seed`` of folds, tuning and
    cv, one ``patch_size`` for every run (None: each backbone's native size), the upload
    (``submit`` with ``message``), ``plan`` only, ``force_folds`` (rewrite a different
    split: the demo regenerates its data) and ``restart`` (retrain every run's folds)."""

    tune: int = 0
    name: str = "all"
    seed: int = 42
    patch_size: int | None = None
    submit: bool = False
    message: str | None = None
    plan: bool = False
    force_folds: bool = False
    restart: bool = False


def run_all(paths, data, runs, settings: dict, weights: dict, options: AllOptions) -> int:
    """Plan, then run every stage that is not done: the data stages, tune and cv per run, the
    blend of the runs marked ``blend``, the report and the optional upload.

    Parameters
    ----------
    paths : kit.paths.Paths
    data : kit.task.Data
    runs : list of kit.commands.all_plan.RunSpec
    settings : dict
        Run name -> its :class:`kit.config.Layered` training settings (checked).
    weights : dict
        Backbone -> weights as cv takes them (``auto``, ``random`` or a path).
    options : AllOptions
    """
    stages = _stages(paths, data, runs, settings, weights, options)
    state = _read_state(paths)
    _print_plan(stages, state, runs)
    if options.plan:
        return 0
    t_all = time.perf_counter()
    for i, (name, stamp_of, _, work) in enumerate(stages, 1):
        # A stamp is taken when its stage comes up: the blend's depends on what cv wrote.
        stamp = stamp_of() if stamp_of is not None else None
        if stamp is not None and state.get(name) == stamp:
            print(f"[{i}/{len(stages)}] {name}: done earlier, skipped")
            continue
        print(f"[{i}/{len(stages)}] {name} ...", flush=True)
        t0 = time.perf_counter()
        summary = work()
        if summary:
            print(f"{name:<14} -> {summary}", flush=True)
        if stamp_of is not None:  # recorded only once the stage has finished
            state[name] = stamp_of()
            atomic_write_json(_state_path(paths), state)
        print(f"[{i}/{len(stages)}] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"all: done in {time.perf_counter() - t_all:.0f} s; submission "
          f"{paths.submissions_dir / 'latest.csv'}, ledger {paths.submissions_dir / 'ledger.csv'}")
    return 0


def _stages(paths, data, runs, settings, weights, opts: AllOptions):
    """``(name, stamp, estimate_seconds, work)`` per stage; ``stamp()`` hashes what the stage
    depends on, and a stage whose stamp equals the one recorded after its last finished run is
    skipped (None: always run; it finds its own finished work, cv fold by fold). ``work()``
    returns the line printed after the stage (or None)."""
    from kit.commands.all_plan import decode_seconds, estimate_cv, forward_rate
    from kit.commands.patches import resolve_configs
    from kit.data import clean, folds, patches
    from kit.data.dataset import load_dataset
    from kit.models.backbones import native_size
    from kit.submission.report import run_report
    from kit.training.fusion import parse_weights, split_name
    from kit.training.settings import train_config, training_path, tta_views

    dataset = load_dataset(data)  # validate: every problem of the data at once, or stop
    n_images = len(dataset.train) + len(dataset.test)
    listing = _listing(dataset)
    clean_cfg, folds_cfg = load_config("clean"), load_config("folds")
    backbones = sorted({p for r in runs for p in split_name(r.backbone)})
    patch_over = {"size": opts.patch_size} if opts.patch_size else {}
    patch_cfgs = resolve_configs(patch_over, None if opts.patch_size else backbones)
    per_image = decode_seconds(dataset)
    cores = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count() or 1)

    def do_clean():
        flagged = clean.run_clean(paths, dataset, clean_cfg)
        return f"{paths.outliers_csv} ({len(flagged)} flagged), {paths.clean_dir / 'review.html'}"

    def do_patches(cfg):
        sets = patches.run_patches(paths, dataset, cfg)
        return f"{sets['train'].folder}, {sets['test'].folder}"

    def do_folds():
        folds.run_folds(paths, dataset, folds_cfg, seed=opts.seed, force=opts.force_folds)
        return str(paths.folds_csv)

    stages = [("clean", lambda: _stamp(listing, clean_cfg, data.task.fingerprint),
               n_images * per_image / cores, do_clean)]
    for cfg in patch_cfgs:
        stages.append((f"patches {cfg['size']}px", None, n_images * per_image / cores,
                       lambda cfg=cfg: do_patches(cfg)))
    stages.append(("folds", None, 1.0, do_folds))
    for r in runs:
        cfg = train_config(settings[r.name])
        size = opts.patch_size or native_size(split_name(r.backbone)[0])
        rate = forward_rate(r.backbone, int(cfg["input_size"] or size))
        est = estimate_cv(len(dataset.train), int(patch_cfgs[0]["top_k"]),
                          len(tta_views(cfg["tta"])), int(folds_cfg["n_splits"]), rate,
                          training_path(cfg), int(cfg["epochs"]))
        w = parse_weights(r.backbone, [f"{p}={weights[p]}" for p in split_name(r.backbone)
                                       if p in weights] or None)
        trials = opts.tune if r.tune is None else r.tune
        if trials:
            stages.append((f"tune {r.name}", None, trials * est / 10,
                           lambda r=r, w=w, n=trials: _tune(paths, data, settings[r.name], r,
                                                            w, n, opts.seed)))
        stages.append((f"cv {r.name}", None, est,
                       lambda r=r, w=w, tuned=bool(trials): _cv(paths, data, settings[r.name],
                                                                r, w, tuned, opts)))
    blend_cfg = load_config("blend")
    names = [r.name for r in runs if r.blend]
    stages.append(("blend", lambda: _stamp(names, blend_cfg, opts.name, opts.seed,
                                           _run_files(paths, names)), 5.0,
                   lambda: _blend(paths, data, blend_cfg, names, opts)))
    every = [r.name for r in runs]
    stages.append(("report", lambda: _stamp(_run_files(paths, every), _latest(paths)), 10.0,
                   lambda: str(run_report(paths, data, load_config("report")))))
    if opts.submit:
        stages.append(("submit", None, 60.0, lambda: _submit(paths, data, opts)))
    return stages


def _cv(paths, data, settings, run, weights, tuned: bool, opts: AllOptions) -> str:
    from kit.training.cv import run_cv

    metrics = run_cv(paths, data, settings, backbone=run.backbone, name=run.name,
                     weights=weights, seed=opts.seed, params="best" if tuned else "none",
                     restart=opts.restart)
    n = len(data.task.classes)
    return (f"{paths.backbone_dir(run.name)} ({metrics['training_path']}, "
            f"{metrics['config']['head']['type']} head): {_oof_line(metrics)} "
            f"(chance {1 / n:.2f} for {n} classes)")


def _oof_line(metrics: dict) -> str:
    """``OOF <metric> <score> [<interval>]`` of a cv run, in the metric it was scored by."""
    from kit.artifacts import run_score
    from kit.metrics import format_ci, get_metric

    metric, score, ci = run_score(metrics)
    return f"OOF {get_metric(metric).title} {format_ci(score, ci)}"


def _tune(paths, data, settings, run, weights, trials: int, seed: int) -> str:
    from kit.metrics import get_metric
    from kit.tuning.tune import run_tune

    cfg = load_config("tune", {"objective": "features", "trials": trials})
    best = run_tune(paths, data, cfg, settings=settings, backbones=[run.backbone],
                    weights=weights, seed=seed)[run.backbone]
    return (f"{paths.tune_dir(run.backbone) / 'best.yaml'} (trial {best['trial']} of "
            f"{trials}, features OOF {get_metric(data.task.metric).title} "
            f"{best['score']:.4f})")


def _blend(paths, data, cfg, names, opts) -> str:
    from kit.ensemble.blend_summary import format_summary
    from kit.submission.blend_output import run_blend

    result = run_blend(paths, data, cfg, backbones=names, name=opts.name, seed=opts.seed)
    print(format_summary(result))
    return (f"{result.csv_path} ({len(result.test_labels)} rows, validated), "
            f"{result.manifest_path.name}, {result.latest_csv}")


def _submit(paths, data, opts) -> None:
    from kit.submission.package import load_manifest
    from kit.submission.submit import run_submit

    latest = paths.submissions_dir / "latest.json"
    manifest = load_manifest(latest)
    sha = manifest.get("csv_sha256")
    done = [s for s in manifest.get("submissions", [])
            if s.get("csv_sha256") == sha and s.get("status") in ("submitted", "complete")]
    if done:
        print(f"submit: {manifest['files']['csv']} was uploaded already (ref "
              f"{done[-1].get('ref')}); ./run.sh submissions --refresh follows its score")
        return
    run_submit(paths, data, load_config("submit"), message=opts.message, wait=True)


def _print_plan(stages, state, runs) -> None:
    from kit.commands.all_plan import format_seconds

    print("all: " + ", ".join(f"{r.name}={r.backbone}" if r.name != r.backbone else r.name
                              for r in runs))
    total = 0.0
    for i, (name, stamp_of, est, _) in enumerate(stages, 1):
        done = stamp_of is not None and state.get(name) == stamp_of()
        note = "done, skipped" if done else f"~{format_seconds(est)}"
        total += 0 if done else est
        print(f"  {i}. {name:<24} {note}")
    print(f"  estimated total: ~{format_seconds(total)} (measured on this device; stages that "
          "find their work done take seconds)")


def _listing(dataset) -> list:
    """What the data stages depend on: every file's name, size and modification time."""
    files = [s.image for s in dataset.train + dataset.test]
    files += [s.mask for s in dataset.train + dataset.test if s.mask is not None]
    return sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def _run_files(paths, names) -> list:
    out = []
    for n in names:
        f = paths.backbone_dir(n) / "metrics.json"
        out.append((n, hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None))
    return out


def _latest(paths):
    f = paths.submissions_dir / "latest.json"
    return hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None


def _stamp(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _state_path(paths) -> "os.PathLike":
    return paths.runs_dir / "all_state.json"


def _read_state(paths) -> dict:
    try:
        return json.loads(_state_path(paths).read_text())
    except (OSError, ValueError):
        return {}
