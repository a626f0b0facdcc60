"""The cv runs of a work directory, by name: what ``./run.sh runs`` lists and ``all`` plans
with. A run is a folder ``runs/<name>/`` with ``metrics.json`` (``cv --name``; the backbone's
name by default)."""
from __future__ import annotations

from kit.artifacts import read_metrics, run_score
from kit.config import train_settings
from kit.ensemble.blend import provenance
from kit.metrics import format_ci, get_metric
from kit.paths import RESERVED_RUN_DIRS, Paths
from kit.training.settings import train_config
from kit.utils import KitError

# What a run's recorded config holds besides train.yaml's keys.
_RECORD_KEYS = ("backbone", "weights", "seed", "params", "training_path", "fusion")


def _flat(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# The keys that decide the training path, and so what head.type auto becomes.
_PATH_KEYS = ("train_norm", "unfreeze_last", "unfreeze_schedule")


def changed_settings(config: dict) -> dict:
    """The training settings of a run's recorded ``config`` that differ from the packaged
    defaults (dotted keys). The head's defaults are those the run's path resolves them to
    (``head.type: auto`` is the probe on cached embeddings), so a run with the default head
    lists no head key."""
    defaults = dict(_flat(train_settings().resolve()))
    path_keys = {k: config[k] for k in _PATH_KEYS if k in config}
    try:
        resolved = train_config(train_settings(path_keys),
                                feature_cache=config.get("training_path") != "pixels")
        defaults.update(_flat({"head": resolved["head"]}, ""))
    except KitError:
        pass  # a run recorded by another version: its path keys no longer load
    mine = dict(_flat({k: v for k, v in config.items() if k not in _RECORD_KEYS}))
    return {k: v for k, v in mine.items() if k in defaults and defaults[k] != v}


def list_runs(paths: Paths) -> list[dict]:
    """One record per finished run (name order): ``name``, ``backbone``, ``metric``,
    ``score``, ``ci95``, ``changed`` (settings that differ from the defaults), ``honest``
    and ``why`` (what makes its score optimistic)."""
    out = []
    if not paths.runs_dir.is_dir():
        return out
    for d in sorted(paths.runs_dir.iterdir()):
        file = d / "metrics.json"
        if d.name in RESERVED_RUN_DIRS or not file.is_file():
            continue
        try:
            m = read_metrics(file, classes=None)
        except KitError:
            continue  # a run being written, or a broken file: blend says why when it reads it
        metric, score, ci = run_score(m)
        prov = provenance(m)
        out.append({"name": d.name, "backbone": m.get("backbone", d.name), "metric": metric,
                    "score": score, "ci95": ci, "changed": changed_settings(m.get("config", {})),
                    "weights": (m.get("config") or {}).get("weights"),
                    "honest": prov["honest"], "why": prov["why"]})
    return out


def format_runs(runs: list[dict]) -> str:
    """The table ``./run.sh runs`` prints."""
    if not runs:
        return "no finished runs (./run.sh cv BACKBONE [--name NAME] writes runs/NAME/)"
    lines = []
    for r in runs:
        title = get_metric(r["metric"]).title
        score = format_ci(r["score"], r["ci95"]) if r["score"] is not None else "?"
        honest = "honest" if r["honest"] else "OPTIMISTIC: " + "; ".join(r["why"])
        changed = ", ".join(f"{k}={v}" for k, v in sorted(r["changed"].items())) or "defaults"
        lines.append(f"{r['name']:<20} {r['backbone']:<16} OOF {title} {score}  {honest}")
        lines.append(f"{'':<20} settings: {changed}; weights: {r['weights']}")
    return "\n".join(lines)
