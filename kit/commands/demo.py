"""``./run.sh demo``: generate the demo dataset and run ``./run.sh all`` on it.

Three runs (:func:`demo_runs`), the blend, the report, the ledger, all under ``runs/demo/``
only; as ``all`` does, it prints its plan first and skips what a previous demo finished. The
stages' modules are imported in the functions that call them: ``./run.sh demo --help`` stays
fast.

``--task LAYOUT`` generates the data in another competition's layout instead
(:func:`kit.data.task_synth.write_task_dataset`: ``imagefolder``, ``csv``, ``csv_masks``, each
with its ``task.yaml``) under ``runs/demo-<layout>/`` and runs the same stages on it, reading
the task as any dataset's.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from kit.config import load_config, train_settings
from kit.paths import Paths
from kit.task import as_data
from kit.utils import KitError, atomic_write_json, sha256_text

OUT = "runs/demo"
LAYOUTS = ("imagefolder", "csv", "csv_masks")  # kit.data.task_synth.LAYOUTS, without importing it


def add_arguments(parser):
    parser.add_argument("--out", default=None,
                        help="work directory for the demo (default: runs/demo, with --task "
                             "runs/demo-<layout>)")
    # The common --task names a task file elsewhere; here the demo writes the task with its
    # data, so it names the layout (and $KIT_TASK, meant for real data, is not read).
    task = next(a for a in parser._actions if "--task" in a.option_strings)
    task.default, task.metavar = None, "LAYOUT"
    task.help = ("generate the demo data in another competition's layout, with its task.yaml: "
                 f"{', '.join(LAYOUTS)} (default: AN2DL's layout and task)")
    # Defaults: kit.data.synth's demo preset (120 training and 40 test images, short side 256).
    parser.add_argument("--n-train", type=int, default=None,
                        help="demo training images (default: 120)")
    parser.add_argument("--n-test", type=int, default=None, help="demo test images (default: 40)")
    parser.add_argument("--short-side", type=int, default=None,
                        help="short image side in px (default: 256)")


def run(args) -> int:
    from kit.commands.all_run import AllOptions, run_all

    if args.task is not None and args.task not in LAYOUTS:
        raise KitError(f"demo --task {args.task}: the demo generates its data in one of the "
                       f"layouts {', '.join(LAYOUTS)}; for your own data run the stages with "
                       "--data DIR --task FILE")
    out = Path(args.out or (OUT if args.task is None else f"{OUT}-{args.task}"))
    paths = Paths.from_root(out)
    given = {"n_train": args.n_train, "n_test": args.n_test, "short_side": args.short_side}
    data = make_data(out / "data", args.task, args.seed,
                     **{k: v for k, v in given.items() if v is not None})
    _forget_other_data(paths, data.root)
    print(f"demo data      -> {data}" + ("" if data.task.builtin else
                                         f" (task {data.task.name}, layout {args.task})"))
    runs = demo_runs()
    settings = {r.name: train_settings(r.sets) for r in runs}
    return run_all(paths, data, runs, settings, {"tiny_cnn": "random", "tiny_vit": "random"},
                   # patches.yaml's size (the recipe's 128 px) for every run, not each
                   # backbone's native 224 px: a third of the pixels on a CPU.
                   AllOptions(name="demo", seed=args.seed, force_folds=True,
                              patch_size=int(load_config("patches")["size"])))


def demo_runs():
    """The demo's runs, as ``all`` takes them: ``tiny_cnn`` trained from random weights (every
    block: nothing pretrained to keep frozen), ``tiny_vit`` frozen with its head tuned on
    cached embeddings (8 trials), and the fusion of both (one head on both backbones' cached
    embeddings), which the report sets beside the blend of the two instead of blending it."""
    from kit.commands.all_plan import RunSpec

    return [RunSpec("tiny_cnn", "tiny_cnn", DEMO_CV, tune=0),
            RunSpec("tiny_vit", "tiny_vit", FROZEN_CV, tune=8),
            RunSpec(FUSION, FUSION, {}, tune=0, blend=False)]


def _forget_other_data(paths: Paths, root: Path) -> None:
    """Remove the outputs of a demo made on other data than ``root`` holds now (its folds,
    runs, study and submissions describe images that are gone, and cv and tune would refuse
    to mix them in), then record which data the outputs here are made from: every file's
    name, size and modification time (the generators keep the files of unchanged arguments).
    """
    stamp = sha256_text(json.dumps(sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*") if p.is_file())))
    record = paths.runs_dir / "demo_data.json"
    try:
        made_from = json.loads(record.read_text()).get("data_sha256")
    except (OSError, ValueError):
        made_from = None
    outputs = [paths.runs_dir, paths.folds_dir, paths.submissions_dir]
    if made_from != stamp and any(d.exists() for d in outputs):
        for folder in outputs:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"demo           other data than the last demo's: its outputs in {paths.root} "
              "were removed")
    atomic_write_json(record, {"data": str(root), "data_sha256": stamp})


def make_data(root: Path, layout: str | None, seed: int, **sizes):
    """The demo dataset as a :class:`kit.task.Data`: AN2DL's (``layout`` None) or one of
    :mod:`kit.data.task_synth`'s layouts at the demo's sizes."""
    from kit.data import demo

    if layout is None:
        return as_data(demo.generate(root, seed=seed, **sizes))
    from kit.data.task_synth import write_task_dataset

    sizes = {**{k: v for k, v in demo.synth.PRESETS["demo"].items()
                if k in ("n_train", "n_test", "short_side")}, **sizes}
    return as_data(write_task_dataset(root, layout, seed=seed, **sizes))


# cv of the tuned backbone: nothing in it trains, as in the features objective.
FROZEN_CV = {"train_norm": [], "unfreeze_last": 0}

# A demo-sized budget: tiny_cnn from random weights, every block trained (nothing pretrained
# to keep frozen), six epochs; about a minute on a 2-core CPU.
DEMO_CV = {"epochs": 6, "patience": 0, "lr": 3e-3, "unfreeze_last": 4}

FUSION = "tiny_cnn+tiny_vit"
