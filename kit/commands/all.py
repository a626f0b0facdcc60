"""``./run.sh all [RUN ...]``: the main job in one command, from the data folder to a checked
submission: validate, clean, patches (each native size the runs need), folds, cv for each run,
optionally tune, blend (a validated submission, its manifest and a ledger row), report, and
optionally the upload. It prints its plan with a time estimate per stage first (measured on
this device), skips what is done, and resumes after a kill (each stage resumes: cv by fold).
"""
from __future__ import annotations

import hashlib
import json
import os
import time

from kit.config import deep_update, load_config, stage_overrides, train_settings
from kit.paths import Paths
from kit.task import as_data
from kit.utils import KitError, atomic_write_json


def add_arguments(parser):
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="BACKBONE or NAME=BACKBONE (a variant named NAME; its own "
                             "settings with --set NAME:KEY=VALUE); default: every backbone "
                             "whose weights are in $KIT_WEIGHTS_DIR")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML file of training settings (train.yaml's keys) for every run")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        metavar="[RUN:]KEY=VALUE",
                        help="a training setting for every run, or with RUN: for that run only")
    parser.add_argument("--weights", action="append", default=[], metavar="BACKBONE=PATH",
                        help="weights of a backbone as cv takes them (auto, random or a path); "
                             "repeatable (default: auto)")
    parser.add_argument("--patch-size", type=int, default=None, metavar="PX",
                        help="one patch cache of this window size for every run (default: "
                             "each backbone's native size)")
    parser.add_argument("--tune", type=int, default=0, metavar="N",
                        help="N trials per backbone (features objective), then cv with the "
                             "best params (default: 0, no tuning)")
    parser.add_argument("--name", default="all", help="the submission's name (default: all)")
    parser.add_argument("--submit", action="store_true",
                        help="upload the submission and wait for its score (needs -m)")
    parser.add_argument("-m", "--message", default=None, help="the submission's message")
    parser.add_argument("--plan", action="store_true", help="print the plan and stop")


def run(args) -> int:
    from kit.commands.all_plan import parse_runs

    if args.submit and not (args.message or "").strip():
        raise KitError("all --submit: give the submission's message with -m 'what changed'")
    paths = Paths.from_root(args.workdir)
    data = as_data(args.data, args.task)
    specs = args.runs or _local_backbones()
    runs, common = parse_runs(specs, args.sets)
    common = deep_update(stage_overrides(args.config, None), common)
    # Every run's settings checked before any work (a typo stops here, in one line).
    settings = {r.name: train_settings(deep_update(common, r.sets)) for r in runs}
    weights = _weights(args.weights)
    stages = _stages(paths, data, runs, settings, weights, args)
    state = _read_state(paths)
    _print_plan(stages, state, runs)
    if args.plan:
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
        work()
        if stamp_of is not None:  # recorded only once the stage has finished
            state[name] = stamp_of()
            atomic_write_json(_state_path(paths), state)
        print(f"[{i}/{len(stages)}] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"all: done in {time.perf_counter() - t_all:.0f} s; submission "
          f"{paths.submissions_dir / 'latest.csv'}, ledger {paths.submissions_dir / 'ledger.csv'}")
    return 0


def _stages(paths, data, runs, settings, weights, args):
    """``(name, stamp, estimate_seconds, work)`` per stage; ``stamp()`` hashes what the stage
    depends on, and a stage whose stamp equals the one recorded after its last finished run is
    skipped (None: always run; it finds its own finished work, cv fold by fold)."""
    from kit.commands.all_plan import decode_seconds, estimate_cv, forward_rate
    from kit.commands.patches import resolve_configs
    from kit.data import clean, folds, patches
    from kit.data.dataset import load_dataset
    from kit.ensemble.blend_summary import format_summary
    from kit.models.backbones import native_size
    from kit.submission.blend_output import run_blend
    from kit.submission.report import run_report
    from kit.training.cv import run_cv
    from kit.training.fusion import parse_weights, split_name
    from kit.training.settings import train_config, training_path, tta_views

    dataset = load_dataset(data)  # validate: every problem of the data at once, or stop
    n_images = len(dataset.train) + len(dataset.test)
    listing = _listing(dataset)
    clean_cfg, folds_cfg = load_config("clean"), load_config("folds")
    backbones = sorted({p for r in runs for p in split_name(r.backbone)})
    patch_over = {"size": args.patch_size} if args.patch_size else {}
    patch_cfgs = resolve_configs(patch_over, None if args.patch_size else backbones)
    per_image = decode_seconds(dataset)
    cores = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count() or 1)
    stages = [
        ("clean", lambda: _stamp(listing, clean_cfg, data.task.fingerprint),
         n_images * per_image / cores,
         lambda: clean.run_clean(paths, dataset, clean_cfg)),
    ]
    for cfg in patch_cfgs:
        stages.append((f"patches {cfg['size']}px", None, n_images * per_image / cores,
                       lambda cfg=cfg: patches.run_patches(paths, dataset, cfg)))
    stages.append(("folds", None, 1.0, lambda: folds.run_folds(paths, dataset, folds_cfg)))
    for r in runs:
        cfg = train_config(settings[r.name])
        size = args.patch_size or native_size(split_name(r.backbone)[0])
        rate = forward_rate(r.backbone, int(cfg["input_size"] or size))
        est = estimate_cv(len(dataset.train), int(patch_cfgs[0]["top_k"]),
                          len(tta_views(cfg["tta"])), int(folds_cfg["n_splits"]), rate,
                          training_path(cfg), int(cfg["epochs"]))
        w = parse_weights(r.backbone, [f"{p}={weights[p]}" for p in split_name(r.backbone)
                                       if p in weights] or None)
        if args.tune:
            stages.append((f"tune {r.backbone}", None, args.tune * est / 10,
                           lambda r=r, w=w: _tune(paths, data, settings[r.name], r, w, args)))
        stages.append((f"cv {r.name}", None, est,
                       lambda r=r, w=w: run_cv(paths, data, settings[r.name],
                                               backbone=r.backbone, name=r.name, weights=w,
                                               seed=args.seed,
                                               params="best" if args.tune else "none")))
    blend_cfg = load_config("blend")
    names = [r.name for r in runs]
    stages.append(("blend", lambda: _stamp(names, blend_cfg, args.name, args.seed,
                                           _run_files(paths, names)), 5.0,
                   lambda: print(format_summary(run_blend(paths, data, blend_cfg,
                                                          backbones=names, name=args.name,
                                                          seed=args.seed)))))
    stages.append(("report", lambda: _stamp(_run_files(paths, names), _latest(paths)), 10.0,
                   lambda: run_report(paths, data, load_config("report"))))
    if args.submit:
        stages.append(("submit", None, 60.0, lambda: _submit(paths, data, args)))
    return stages


def _tune(paths, data, settings, run, weights, args) -> None:
    from kit.tuning.tune import run_tune

    cfg = load_config("tune", {"objective": "features", "trials": args.tune})
    run_tune(paths, data, cfg, settings=settings, backbones=[run.backbone], weights=weights,
             seed=args.seed)


def _submit(paths, data, args) -> None:
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
    run_submit(paths, data, load_config("submit"), message=args.message, wait=True)


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


def _local_backbones() -> list[str]:
    from kit.models.backbones import list_backbones
    from kit.models.weights import local_weights

    found = [b for b in list_backbones() if local_weights(b) is not None]
    if not found:
        raise KitError("all: no run given and no backbone weights in $KIT_WEIGHTS_DIR; name "
                       "the runs (e.g. ./run.sh all phikon) or put weights in "
                       "$KIT_WEIGHTS_DIR/<backbone>")
    return found


def _weights(items) -> dict:
    out = {}
    for item in items:
        bb, eq, value = str(item).partition("=")
        if not eq or not value:
            raise KitError(f"--weights {item!r}: expected BACKBONE=auto|random|PATH")
        out[bb] = value
    return out


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
