"""Search spaces for ``./run.sh tune``: declared in YAML, one place per backbone.

A space maps dotted config keys (the names ``cv --params`` takes: ``head.depth``, ``lr``,
``augment.cutmix_alpha``) to a distribution::

    head.depth: {type: int, low: 0, high: 4}
    lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
    head.activation: {type: categorical, choices: [relu, gelu]}
    augment.cutmix_alpha: {type: categorical, choices: [0.0, 0.5], objectives: [full]}
    head.norm: layernorm          # a plain value: fixed, not searched

``kit/conf/tune.yaml`` holds ``space: {default: {...}, <backbone>: {...}}``; a user file
(``--space FILE``) has the same shape and is merged over it, entry by entry, with the
backbone's own entry merged over ``default`` at each level. ``null`` removes a parameter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit.config import Layered
from kit.training.settings import train_config
from kit.utils import KitError, read_yaml

TYPES = ("int", "float", "categorical")
OBJECTIVES = ("features", "full")
_FIELDS = {"type", "low", "high", "log", "step", "choices", "objectives"}


@dataclass(frozen=True)
class Param:
    """One searched (or fixed) parameter; ``type == "fixed"`` carries ``value`` only."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    value: Any = None
    objectives: tuple = OBJECTIVES

    def suggest(self, trial):
        """The trial's value of this parameter (Optuna's ``suggest_*``)."""
        if self.type == "fixed":
            return self.value
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high),
                                     step=int(self.step or 1), log=self.log)
        if self.type == "float":
            return trial.suggest_float(self.name, float(self.low), float(self.high),
                                       step=self.step, log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))

    def contains(self, value) -> bool:
        """Whether ``value`` lies in this parameter's domain (for enqueued trials)."""
        if self.type == "fixed":
            return value == self.value
        if self.type == "categorical":
            return value in self.choices
        try:
            v = float(value)
        except (TypeError, ValueError):
            return False
        if self.type == "int" and v != int(v):
            return False
        return self.low <= v <= self.high


@dataclass
class Space:
    """The parameters searched for one backbone and objective."""

    backbone: str
    objective: str
    params: dict[str, Param] = field(default_factory=dict)

    @property
    def searched(self) -> dict[str, Param]:
        return {k: p for k, p in self.params.items() if p.type != "fixed"}

    @property
    def fixed(self) -> dict[str, Any]:
        return {k: p.value for k, p in self.params.items() if p.type == "fixed"}

    def suggest(self, trial) -> dict[str, Any]:
        """All parameters (searched and fixed) as dotted config overrides."""
        return {name: p.suggest(trial) for name, p in self.params.items()}

    def to_dict(self) -> dict:
        """Plain form for config.yaml (the same shape as an entry of the YAML space)."""
        return {name: _plain(p) for name, p in self.params.items()}


def parse_param(name: str, spec, source: str) -> Param:
    """One entry of a space; ``source`` names the file in error messages."""
    where = f"{source}: parameter {name!r}"
    if not isinstance(spec, dict):
        return Param(name, "fixed", value=spec)
    unknown = set(spec) - _FIELDS
    if unknown:
        raise KitError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                       f"use {', '.join(sorted(_FIELDS))}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise KitError(f"{where}: type must be one of {', '.join(TYPES)} (got {kind!r})")
    objectives = spec.get("objectives", list(OBJECTIVES))
    if isinstance(objectives, str):
        objectives = [objectives]
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        raise KitError(f"{where}: objectives must be a non-empty list of "
                       f"{', '.join(OBJECTIVES)} (got {objectives!r})")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise KitError(f"{where}: categorical needs a non-empty list `choices`")
        if any(isinstance(c, (dict, list)) for c in choices):
            raise KitError(f"{where}: choices must be plain values (numbers, strings, bools)")
        extra = set(spec) - {"type", "choices", "objectives"}
        if extra:
            raise KitError(f"{where}: categorical takes no {', '.join(sorted(extra))}")
        return Param(name, kind, choices=tuple(choices), objectives=tuple(objectives))
    return _numeric(name, kind, spec, where, tuple(objectives))


def _numeric(name, kind, spec, where, objectives) -> Param:
    if "choices" in spec:
        raise KitError(f"{where}: `choices` is for type categorical")
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except KeyError as exc:
        raise KitError(f"{where}: {kind} needs `low` and `high` (missing {exc.args[0]!r})") \
            from exc
    except (TypeError, ValueError) as exc:
        raise KitError(f"{where}: low/high must be numbers (got {spec.get('low')!r}, "
                       f"{spec.get('high')!r})") from exc
    log, step = bool(spec.get("log", False)), spec.get("step")
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise KitError(f"{where}: need finite low <= high (got {low}, {high})")
    if log and low <= 0:
        raise KitError(f"{where}: log scale needs low > 0 (got {low})")
    if step is not None:
        if log:
            raise KitError(f"{where}: `step` and `log` cannot be combined")
        if not isinstance(step, (int, float)) or step <= 0:
            raise KitError(f"{where}: step must be a positive number (got {step!r})")
    if kind == "int":
        if low != int(low) or high != int(high) or (step is not None and step != int(step)):
            raise KitError(f"{where}: int needs integer low, high and step")
        return Param(name, kind, int(low), int(high), log, int(step) if step else None,
                     objectives=objectives)
    return Param(name, kind, low, high, log, float(step) if step else None, objectives=objectives)


def merge_entries(*entries: dict | None) -> dict:
    """Later entries win parameter by parameter; a ``None`` value removes the parameter."""
    out: dict = {}
    for entry in entries:
        for name, spec in (entry or {}).items():
            if spec is None:
                out.pop(name, None)
            else:
                out[name] = spec
    return out


def _entries(raw, source: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or \
            not all(isinstance(v, (dict, type(None))) for v in raw.values()):
        raise KitError(f"{source}: a search space is a mapping `default:` and/or `<backbone>:`, "
                       "each mapping parameter names to {type: ..., ...} or a fixed value")
    return raw


def load_space(backbone: str, objective: str, base: dict, file: str | Path | None = None,
               known_keys: set[str] | None = None) -> Space:
    """The space of ``backbone`` for ``objective``.

    Parameters
    ----------
    backbone, objective : str
        ``objective`` drops the parameters whose ``objectives`` do not list it.
    base : dict
        The ``space`` section of the resolved tune config.
    file : path, optional
        User YAML (``--space``) merged over ``base``.
    known_keys : set of str, optional
        Dotted keys cv accepts; any other name is refused (a typo would silently tune nothing).
    """
    if objective not in OBJECTIVES:
        raise KitError(f"objective must be one of {', '.join(OBJECTIVES)} (got {objective!r})")
    base = _entries(base, "kit/conf/tune.yaml space")
    layers = [base.get("default"), base.get(backbone)]
    source = "kit/conf/tune.yaml"
    if file is not None:
        user = _entries(read_yaml(file), str(file))
        layers += [user.get("default"), user.get(backbone)]
        source = str(file)
    merged = merge_entries(*layers)
    params = {}
    for name, spec in merged.items():
        p = parse_param(str(name), spec, source)
        if objective in p.objectives:
            params[p.name] = p
    if known_keys is not None:
        unknown = sorted(set(params) - set(known_keys))
        if unknown:
            raise KitError(f"{source}: unknown parameter(s) {', '.join(unknown)} for {backbone}; "
                           "names are cv's dotted config keys (e.g. head.depth, lr, "
                           "augment.cutmix_alpha)")
    if not any(p.type != "fixed" for p in params.values()):
        raise KitError(f"{source}: nothing to search for {backbone} with objective {objective}")
    return Space(backbone, objective, params)


def dotted_keys(cfg: dict, prefix: str = "") -> set[str]:
    """Every leaf key of a nested config as ``a.b.c``."""
    out = set()
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= dotted_keys(value, name + ".")
        else:
            out.add(name)
    return out


def known_param_keys(settings: Layered) -> set[str]:
    """Dotted keys ``cv --params`` accepts (train.yaml, augment.yaml under ``augment.``)."""
    return dotted_keys(train_config(settings))


def _plain(p: Param):
    if p.type == "fixed":
        return p.value
    out = {"type": p.type}
    if p.type == "categorical":
        out["choices"] = list(p.choices)
    else:
        out.update(low=p.low, high=p.high)
        if p.log:
            out["log"] = True
        if p.step is not None:
            out["step"] = p.step
    if tuple(p.objectives) != OBJECTIVES:
        out["objectives"] = list(p.objectives)
    return out
