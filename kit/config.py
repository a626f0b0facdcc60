"""Config groups, one small YAML file per concern under ``kit/conf/``.

``load_config("patches", {"size": 96})`` returns the defaults of that group with the
overrides applied; unknown keys are refused so that a typo never goes unnoticed.

One override syntax everywhere: dotted keys. On the command line every stage takes
``--config FILE`` (a YAML mapping of its group, nested or dotted) and ``--set KEY=VALUE``
(repeatable, e.g. ``--set head.depth=2 --set augment.cutmix_alpha=0.5``); a stage's own
flags (``--epochs``) win over both. :func:`stage_overrides` turns them into the nested
overrides the stage functions take.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from kit.schema import GROUPS, check
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
        cfg = merge(cfg, dotted_to_nested(read_yaml(file), str(file)), source=str(file))
    if overrides:
        cfg = merge(cfg, {k: v for k, v in overrides.items() if v is not None}, source="overrides")
    # train is checked whole, with its sections, by train_settings.
    return cfg if group == "train" or group not in GROUPS else check(group, cfg)


@dataclass(frozen=True)
class Layered:
    """A config its command resolved, with the user's overrides (``--config`` < ``--set`` <
    flags, nested) kept apart from the packaged defaults, because a layer found later by the
    stage (cv's tuned params, ``best.yaml``) slots in between: defaults < params < overrides.
    """

    defaults: dict
    overrides: dict = field(default_factory=dict)

    def resolve(self, params: dict | None = None) -> dict:
        """``defaults`` <- ``params`` (nested) <- ``overrides``; unknown keys are refused."""
        cfg = copy.deepcopy(self.defaults)
        if params:
            cfg = merge(cfg, params, source="params")
        if self.overrides:
            cfg = merge(cfg, {k: v for k, v in self.overrides.items() if v is not None},
                        source="config")
        return cfg

    def plus(self, overrides: dict | None) -> "Layered":
        """The same defaults with ``overrides`` (nested) over this one's."""
        return Layered(self.defaults, deep_update(self.overrides, overrides or {}))


# The groups cv, tune and the benches train with: train.yaml, with augment.yaml and
# features.yaml (the embedding cache) as its sections, so that one --set reaches all three.
TRAIN_SECTIONS = ("augment", "features")


def train_settings(overrides: dict | None = None) -> Layered:
    """The training settings a command hands down: the defaults of ``train`` (with its
    sections) and ``overrides``; a key that does not exist fails here, at the command."""
    defaults = load_config("train")
    for section in TRAIN_SECTIONS:
        defaults[section] = load_config(section)
    layered = Layered(defaults, dict(overrides or {}))
    check("train", layered.resolve())
    return layered


def given(cfg, group: str) -> dict:
    """The resolved ``group`` config a stage was handed (commands resolve it once with
    :func:`load_config`); a missing one is refused with the fix, never filled from YAML here."""
    if not isinstance(cfg, dict):
        raise KitError(f"the {group} stage takes its resolved config, e.g. "
                       f"kit.config.load_config({group!r}, overrides) (got {type(cfg).__name__})")
    return cfg


def dotted_to_nested(values: dict, source: str = "config") -> dict:
    """``{"head.depth": 2, "lr": 1e-3}`` -> ``{"head": {"depth": 2}, "lr": 1e-3}`` (nested
    mappings pass through, so a file may mix both forms)."""
    out: dict = {}
    for key, value in values.items():
        node = out
        *parents, leaf = str(key).split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise KitError(f"{source}: {key!r} conflicts with another key")
        if isinstance(value, dict):
            value = dotted_to_nested(value, source)
            if isinstance(node.get(leaf), dict):  # "head.x.y" and "head: {x: {z}}" both kept
                value = deep_update(node[leaf], value)
        node[leaf] = value
    return out


def parse_value(text: str):
    """A ``--set`` value as YAML reads it (``2``, ``true``, ``[a, b]``, ``null``), with
    ``3e-4`` read as a number (YAML 1.1 would keep it a string)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def stage_overrides(file: str | Path | None = None, sets=None) -> dict:
    """Nested overrides from ``--config FILE`` then ``--set KEY=VALUE`` items (later wins)."""
    out: dict = {}
    if file is not None:
        if not Path(file).is_file():
            raise KitError(f"--config {file}: no such file; give a YAML mapping of the stage's "
                           "settings (see kit/conf/)")
        data = read_yaml(file)
        if not isinstance(data, dict):
            raise KitError(f"{file}: expected a mapping of settings (dotted or nested keys)")
        out = dotted_to_nested(data, str(file))
    for item in sets or ():
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise KitError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. "
                           "--set head.depth=2")
        out = deep_update(out, dotted_to_nested({key.strip(): parse_value(text)}, "--set"))
    return out


def deep_update(base: dict, new: dict) -> dict:
    """A copy of ``base`` with nested mapping ``new`` merged in, key by key (``new`` wins)."""
    out = copy.deepcopy(base)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def with_flags(overrides: dict, flags: dict) -> dict:
    """``overrides`` with the stage's own flags (dotted or nested keys) on top; ``None``
    flags were not given."""
    return deep_update(overrides, dotted_to_nested(
        {k: v for k, v in flags.items() if v is not None}, "flags"))


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
