"""Config groups, one small YAML file per concern under ``kit/conf/``.

``load_config("patches", {"size": 96})`` returns the defaults of that group with the
overrides applied; unknown keys are refused so that a typo never goes unnoticed.
"""
from __future__ import annotations

import copy
from pathlib import Path

from kit.utils import KitError, read_yaml

CONF_DIR = Path(__file__).parent / "conf"


def load_config(group: str, overrides: dict | None = None, file: str | Path | None = None) -> dict:
    """Defaults of ``group`` <- values from ``file`` (a YAML mapping) <- ``overrides``.

    ``None`` values in ``overrides`` mean "not given" and are skipped, so argparse
    namespaces can be passed through as they are.
    """
    path = CONF_DIR / f"{group}.yaml"
    if not path.exists():
        raise KitError(f"no config group {group!r} (looked for {path})")
    cfg = read_yaml(path)
    if file is not None:
        cfg = merge(cfg, read_yaml(file), source=str(file))
    if overrides:
        cfg = merge(cfg, {k: v for k, v in overrides.items() if v is not None}, source="overrides")
    return cfg


def merge(base: dict, new: dict, source: str = "config") -> dict:
    """Deep-merge ``new`` into a copy of ``base``; keys must already exist in ``base``."""
    out = copy.deepcopy(base)
    for key, value in new.items():
        if key not in out:
            raise KitError(f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(out))}")
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge(out[key], value, source=f"{source}.{key}")
        else:
            out[key] = value
    return out
