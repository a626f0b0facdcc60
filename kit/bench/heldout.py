"""What the benches scored on held-back test labels share (``bench honesty``, ``noise`` and
``regions``): their options, the sizes of a run (:class:`Preset`), each seed's generated set
with its data stages, the one reader of the held-back labels, and small helpers for their
tables.

The data comes from :mod:`kit.data.synth` with ``test_labels=True``: the test labels are held
back in ``test_labels_heldout.csv``, a file no stage of the kit reads; only
:func:`heldout_labels` does, to score the test predictions. Everything is reused while its
inputs match: the generated sets (``synth.generate``'s own check) and the data stages' outputs
(a stamp in the work directory).

Torch and the models are imported where they are used: a bench module is imported to build
its ``--help`` (:mod:`kit.bench`).
"""
from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from kit.config import load_config
from kit.paths import Paths
from kit.utils import KitError, atomic_write_json

BACKBONE = "tiny_cnn"  # the benches' stand-in for a pretrained backbone (kit.bench.honesty)


@dataclass(frozen=True)
class Preset:
    """Sizes of one benchmark: the generated sets, the stages' settings and the training budget.

    ``data``/``standin_data``: :func:`kit.data.synth.generate` arguments of the scored sets (set B)
    and of the stand-in's training set (set A), without the seed. ``patches``/``folds``:
    overrides of ``patches.yaml``/``folds.yaml``. ``train``: ``train.yaml`` overrides of every
    scored cv run; ``standin``: of the stand-in's training (from scratch, fold 0 only).
    """

    name: str
    data: dict
    standin_data: dict
    patches: dict = field(default_factory=dict)
    folds: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    standin: dict = field(default_factory=dict)
    seeds: int = 3


def generated_data_arguments(parser, bench: str) -> None:
    """The options of a bench that generates its own data (it needs held-back test labels):
    ``--data`` unused, ``--seed`` the first set's seed, ``--epochs`` and ``--device``."""
    parser.set_defaults(data=None)
    for action in parser._actions:
        if action.dest == "data":
            action.help = f"not used: bench {bench} generates its own data (it needs test labels)"
        elif action.dest == "seed":
            action.help = ("first seed: the sets are generated with --seed, --seed + 1, ... "
                           "(default: 42)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of every scored cv run (default: the preset's)")
    parser.add_argument("--device", choices=("cpu", "cuda", "mps"), default=None,
                        help="training device (default: the best available)")


def preset_and_seeds(args, preset, bench: str):
    """``(preset, seeds)`` of such a bench from its options: ``--data`` refused, ``--epochs``
    over the preset's training, ``--seeds`` sets from ``--seed`` on."""
    if getattr(args, "data", None):
        raise KitError(f"bench {bench} generates its own data (it needs held-back test labels); "
                       "drop --data")
    if args.epochs is not None:
        if args.epochs < 1:
            raise KitError(f"--epochs must be >= 1 (got {args.epochs})")
        preset = replace(preset, train={**preset.train, "epochs": args.epochs})
    seed = int(getattr(args, "seed", 42) or 0)
    n_seeds = preset.seeds if args.seeds is None else args.seeds
    if n_seeds < 1:
        raise KitError(f"--seeds must be >= 1 (got {n_seeds})")
    return preset, [seed + i for i in range(n_seeds)]


def parse_names(text: str, known, option: str) -> list[str]:
    """The comma-separated names of an option such as ``--modes``, each of ``known``, in order
    and once; a KitError naming the unknown ones."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise KitError(f"{option}: unknown {', '.join(unknown) or 'empty list'}; use any of "
                       f"{', '.join(known)}, comma-separated")
    return list(dict.fromkeys(names))


def _stage_stamp(data: Path, preset: Preset, seed: int) -> dict:
    from kit.data import synth

    return {"data": json.loads((Path(data) / synth.META_JSON).read_text()),
            "patches": preset.patches, "folds": preset.folds, "seed": seed}


def run_data_stages(data: Path, paths, preset: Preset, seed: int) -> None:
    """clean, patches and folds on ``data`` (skipped when done for the same data and settings)."""
    from kit.data import clean, folds, patches

    stamp_file = paths.runs_dir / "bench_stages.json"
    stamp = _stage_stamp(data, preset, seed)
    try:
        if json.loads(stamp_file.read_text()) == json.loads(json.dumps(stamp)):
            return
    except (OSError, ValueError):
        pass
    clean.run_clean(paths, data, load_config("clean"))
    patches.run_patches(paths, data, load_config("patches", preset.patches or None))
    folds.run_folds(paths, data, load_config("folds", preset.folds or None), seed=seed,
                    force=True)
    atomic_write_json(stamp_file, stamp)


def prepare_seed(folder: Path, preset: Preset, seed: int):
    """Set B of ``seed`` (with held-back test labels) and its work directory, stages run."""
    from kit.data import synth

    t0 = time.perf_counter()
    data = synth.generate(folder / "data", **preset.data, seed=seed, test_labels=True)
    t_data = time.perf_counter() - t0
    paths = Paths.from_root(folder / "work")
    run_data_stages(data, paths, preset, seed)
    info = {"root": str(data), "generate_or_reuse_s": round(t_data, 1),
            "stages_s": round(time.perf_counter() - t0 - t_data, 1)}
    return data, paths, info


def warm_up(paths, device=None) -> None:
    """Touch what the first timed run would otherwise pay for alone: the patch caches (page
    cache) and torch's kernels, so that the seconds ratios compare like with like."""
    import numpy as np
    import torch

    from kit.data.patches import load_patches
    from kit.models.backbones import create_backbone
    from kit.training.device import pick_device

    for split in ("train", "test"):
        array = load_patches(paths, split).array
        for a in range(0, len(array), 64):
            np.asarray(array[a:a + 64]).max()
    dev = pick_device(device)
    bb = create_backbone(BACKBONE, weights="random", patch_size=int(array.shape[2])).to(dev)
    x = torch.rand(8, 3, int(array.shape[2]), int(array.shape[2]), device=dev)
    bb(x).sum().backward()


def heldout_labels(data) -> dict[str, str]:
    """sample_index -> held-back test label. The bench's only reader of that file."""
    from kit.data import synth

    df = synth.read_test_labels(data)
    return dict(zip(df.sample_index, df.label))


def cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (DataLoader workers)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def num(v, fmt: str) -> str:
    """``v`` formatted, or ``-`` when missing (None or NaN): the benches' table cells."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def mean_of(values) -> float:
    """The mean of the values present (None and NaN left out), NaN when none is: averages
    over seeds where a seed may lack a score."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(sum(values) / len(values)) if values else math.nan


def per_seed_line(rows) -> str:
    """The summary line of each arm's test / OOF score per seed."""
    return "    per seed (test / OOF): " + "; ".join(
        f"{r['arm']} " + ", ".join(f"{t:.3f}/{o:.3f}" for t, o in
                                    zip(r["per_seed_test"], r["per_seed_oof"]))
        for r in rows)


def read_table(path: Path):
    """A CSV the kit wrote (``oof.csv``, ``test.csv``, label files) with ``sample_index`` and
    ``label`` read as text."""
    import pandas as pd

    return pd.read_csv(path, dtype={"sample_index": str, "label": str}, keep_default_na=False)
