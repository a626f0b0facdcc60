"""The value types settings are declared with: numbers that refuse booleans, ranges,
choices, and the syntax of the few settings that take a small language of their own."""
from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, Strict
from pydantic_core import PydanticCustomError

from kit.utils import KitError


def _no_bool(value):
    # pydantic's lax mode reads true as 1: a setting that is a number never means yes/no.
    if isinstance(value, bool):
        raise PydanticCustomError("number_type", "expected a number, not true/false")
    return value


Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]  # "yes" is a string here: YAML has already read its true/false
Float = Annotated[float, BeforeValidator(_no_bool)]


def between(low=None, high=None, *, low_open=False, high_open=False, kind=Float):
    """A number type bounded by ``low``/``high`` (closed unless ``*_open``)."""
    bounds = {}
    if low is not None:
        bounds["gt" if low_open else "ge"] = low
    if high is not None:
        bounds["lt" if high_open else "le"] = high
    return Annotated[kind, Field(**bounds)]


Probability = between(0, 1)
PositiveInt = between(1, kind=Int)
NonNegativeInt = between(0, kind=Int)
NonNegative = between(0)
Pixel = between(0, 255, kind=Int)


def _off_is_false(value):
    # YAML 1.1 reads a bare off/no/none as false/null: the same choice as "off".
    return "off" if value is False or value is None else value


def off_or(*choices):
    """A choice among ``"off"`` and ``choices`` where YAML's false (a bare ``off``) is off."""
    from typing import Literal

    return Annotated[Literal[("off",) + tuple(choices)], BeforeValidator(_off_is_false)]


# --------------------------------------------------------------------------- unfreeze schedule

SCHEDULE_SETTING = "train: unfreeze_schedule"
SCHEDULE_HELP = ("give a mapping {epoch: n_last_blocks} (e.g. {0: 0, 3: 1, 10: all}), a list "
                 "of [epoch, n] pairs, a string \"0:0,3:1,10:all\", \"gradual:K\" or none")
_GRADUAL = re.compile(r"^gradual:(\d+)(?::(\d+))?$")


def parse_schedule(spec) -> tuple | None:
    """The validated form of an ``unfreeze_schedule`` value.

    Returns
    -------
    None, ("stages", ((epoch, n), ...)) or ("gradual", K, N)
        ``None``: no schedule. Stages are sorted by epoch, ``n`` an int or ``"all"``, never
        decreasing; ``N`` is ``None`` for all blocks.
    """
    if spec is None or spec is False or (isinstance(spec, (list, tuple, dict)) and not spec):
        return None
    if isinstance(spec, str):
        text = spec.strip().lower().replace(" ", "")
        if text in ("", "none", "off"):
            return None
        match = _GRADUAL.match(text)
        if match:
            every, cap = int(match.group(1)), match.group(2)
            if every < 1 or (cap is not None and int(cap) < 1):
                raise KitError(f"{SCHEDULE_SETTING}: gradual:K needs K >= 1 (and a cap N >= 1) "
                               f"(got {spec!r})")
            return ("gradual", every, None if cap is None else int(cap))
        pairs = []
        for part in text.split(","):
            epoch, sep, n = part.partition(":")
            if not sep:
                raise KitError(f"{SCHEDULE_SETTING}: cannot read {spec!r}; {SCHEDULE_HELP}")
            pairs.append((epoch, n))
    elif isinstance(spec, dict):
        pairs = list(spec.items())
    elif isinstance(spec, (list, tuple)):
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in spec):
            raise KitError(f"{SCHEDULE_SETTING}: a list must hold [epoch, n] pairs (got "
                           f"{spec!r}); {SCHEDULE_HELP}")
        pairs = [tuple(p) for p in spec]
    elif isinstance(spec, int) and not isinstance(spec, bool):
        # YAML 1.1 reads an unquoted 3:1 as the base-60 number 181.
        raise KitError(f"{SCHEDULE_SETTING}: cannot read the number {spec!r} (YAML reads an "
                       "unquoted E:N as a base-60 number); quote it (\"3:1\") or write {3: 1}")
    else:
        raise KitError(f"{SCHEDULE_SETTING}: cannot read {spec!r} (a {type(spec).__name__}); "
                       f"{SCHEDULE_HELP}")
    stages = sorted((_epoch(e, spec), _count(n, spec)) for e, n in pairs)
    epochs = [e for e, _ in stages]
    if len(set(epochs)) != len(epochs):
        raise KitError(f"{SCHEDULE_SETTING}: epoch given twice in {spec!r}")
    counts = [math.inf if n == "all" else n for _, n in stages]
    if any(b < a for a, b in zip(counts, counts[1:])):
        raise KitError(f"{SCHEDULE_SETTING}: block counts must not decrease with the epoch "
                       f"(blocks thaw, never freeze again) (got {spec!r})")
    return ("stages", tuple(stages))


def _epoch(value, spec) -> int:
    try:
        out = int(str(value).strip())
    except ValueError:
        out = -1
    if isinstance(value, (bool, float)) or out < 0:
        raise KitError(f"{SCHEDULE_SETTING}: epochs must be integers >= 0 (got {value!r} in "
                       f"{spec!r})")
    return out


def _count(value, spec):
    if str(value).strip().lower() == "all":
        return "all"
    try:
        out = int(str(value).strip())
    except ValueError:
        out = -1
    if isinstance(value, (bool, float)) or out < 0:
        raise KitError(f"{SCHEDULE_SETTING}: block counts must be integers >= 0 or all (got "
                       f"{value!r} in {spec!r})")
    return out


def _schedule(value):
    try:
        parse_schedule(value)
    except KitError as err:
        raise ValueError(str(err).split(": ", 2)[-1]) from None
    return value


Schedule = Annotated[Any, AfterValidator(_schedule)]


# --------------------------------------------------------------------------- test-time views

# kit.training.tta's views and sets, by name (tests/test_schema.py keeps the two in step).
TTA_VIEWS = ("id", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "antitranspose")
TTA_SETS = ("flips", "dihedral", "none", "off")


def _views(value):
    if value is False or value is None:
        return value
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    if isinstance(value, str) and value.strip().lower() in TTA_SETS:
        return value
    bad = [n for n in names if n not in TTA_VIEWS]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"expected one of the sets {', '.join(TTA_SETS)} or distinct views "
                         f"among {', '.join(TTA_VIEWS)}")
    return value


Views = Annotated[str | list[str] | None, AfterValidator(_views)]
