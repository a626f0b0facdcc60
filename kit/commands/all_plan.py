"""``./run.sh all``'s plan: the run specifications, and a time estimate per stage from this
device's measured throughput (a few timed forward passes and one decoded image)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from kit.config import deep_update, dotted_to_nested, parse_value
from kit.paths import check_run_name
from kit.utils import KitError


@dataclass
class RunSpec:
    """One cv run of ``all``: its name, backbone and its own settings (over the common ones);
    ``tune``: its trials (None: ``all --tune``'s); ``blend``: whether the blend takes it (the
    demo's fusion run is reported beside the blend of the separate runs, not in it)."""

    name: str
    backbone: str
    sets: dict = field(default_factory=dict)
    tune: int | None = None
    blend: bool = True


def parse_runs(specs, sets) -> tuple[list[RunSpec], dict]:
    """Run specs (``BACKBONE`` or ``NAME=BACKBONE``) and ``--set`` items: ``KEY=VALUE`` for
    every run, ``NAME:KEY=VALUE`` for the run NAME only. Returns the runs and the common
    overrides (nested)."""
    from kit.models.backbones import list_backbones
    from kit.training.fusion import split_name

    runs, known = [], set(list_backbones())
    for spec in specs:
        name, eq, backbone = str(spec).partition("=")
        backbone = backbone if eq else name
        bad = [p for p in split_name(backbone) if p not in known] if backbone else [backbone]
        if bad:
            raise KitError(f"all: run {spec!r}: unknown backbone {bad[0]!r}; give BACKBONE or "
                           f"NAME=BACKBONE with one of {', '.join(sorted(known))}")
        runs.append(RunSpec(check_run_name(name), backbone))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise KitError(f"all: run names repeated in {', '.join(names)}; name variants "
                       "NAME=BACKBONE")
    common: dict = {}
    by_name = {r.name: r for r in runs}
    for item in sets or ():
        key, sep, text = str(item).partition("=")
        if not sep:
            raise KitError(f"--set {item!r}: expected [RUN:]KEY=VALUE")
        run, colon, dotted = key.partition(":")
        if colon and run not in by_name:
            raise KitError(f"--set {item!r}: no run named {run!r} (runs: {', '.join(names)})")
        nested = dotted_to_nested({(dotted if colon else key).strip(): parse_value(text)})
        if colon:
            by_name[run].sets = deep_update(by_name[run].sets, nested)
        else:
            common = deep_update(common, nested)
    return runs, common


def decode_seconds(dataset) -> float:
    """Seconds to decode one training image of a loaded dataset here (the first one), for
    clean and patches."""
    from kit.data.dataset import read_image

    sample = dataset.train[0] if dataset.train else dataset.test[0]
    t0 = time.perf_counter()
    read_image(sample.image)
    return time.perf_counter() - t0


def forward_rate(backbone: str, size: int, device: str = "cpu", batch: int = 8) -> float:
    """Patches per second through ``backbone`` (random weights, eval mode) at ``size`` px on
    ``device``: two timed batches after a warm-up one."""
    import torch

    from kit.models.backbones import create_backbone
    from kit.training.fusion import split_name

    seconds = 0.0
    for part in split_name(backbone):
        model = create_backbone(part, "random").to(device).eval()
        x = torch.rand(batch, 3, size, size, device=device)
        with torch.inference_mode():
            model(x)
            t0 = time.perf_counter()
            for _ in range(2):
                model(x)
        seconds += (time.perf_counter() - t0) / (2 * batch)
    return 1.0 / max(seconds, 1e-9)


def estimate_cv(n_images: int, top_k: int, n_views: int, n_folds: int, rate: float,
                training_path: str, epochs: int) -> float:
    """Seconds of one cv run: one embedding pass (cached embeddings; the heads train in
    seconds), or every fold's epochs over its training patches, a backward pass costing about
    twice the forward (pixels)."""
    patches = n_images * top_k
    if training_path == "feature_cache":
        return patches * n_views / rate + 5 * n_folds
    per_epoch = patches * (n_folds - 1) / n_folds * 3 / rate
    return n_folds * (epochs * per_epoch + patches / n_folds * n_views / rate)


def format_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"
