"""Test-time augmentation views: the eight symmetries of the square on ``B x C x H x W`` tensors.

Histology patches have no preferred orientation, so every dihedral view is an equally valid
picture of the same tissue; predictions are averaged over the chosen views.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

from kit.utils import KitError

H, W = -2, -1


def _rot(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.rot90(x, k, dims=(H, W))


def _transpose(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(H, W)


def _antitranspose(x: torch.Tensor) -> torch.Tensor:
    # Mirror about the anti-diagonal: transpose, then rotate by 180 degrees.
    return x.transpose(H, W).flip(H, W)


# name -> view; the order is the order of the per-view output files.
VIEWS: "OrderedDict[str, Callable[[torch.Tensor], torch.Tensor]]" = OrderedDict([
    ("id", lambda x: x),
    ("hflip", lambda x: x.flip(W)),
    ("vflip", lambda x: x.flip(H)),
    ("rot90", _rot(1)),
    ("rot180", _rot(2)),
    ("rot270", _rot(3)),
    ("transpose", _transpose),
    ("antitranspose", _antitranspose),
])
# Every view is its own inverse except the quarter turns, which undo each other.
_INVERSE = {name: name for name in VIEWS} | {"rot90": "rot270", "rot270": "rot90"}

DEFAULT_VIEWS = ("id", "hflip", "vflip")
VIEW_SETS = {"flips": DEFAULT_VIEWS, "dihedral": tuple(VIEWS)}


def _check(name: str) -> str:
    if name not in VIEWS:
        raise KitError(f"unknown TTA view {name!r}; known views: {', '.join(VIEWS)} "
                       f"(or the sets {', '.join(VIEW_SETS)})")
    return name


def apply_view(x: torch.Tensor, name: str) -> torch.Tensor:
    """The view ``name`` of a ``... x H x W`` tensor (usually ``B x C x H x W``)."""
    return VIEWS[_check(name)](x)


def invert_view(x: torch.Tensor, name: str) -> torch.Tensor:
    """Undo :func:`apply_view`: ``invert_view(apply_view(x, v), v)`` equals ``x``."""
    return VIEWS[_INVERSE[_check(name)]](x)


def get_views(views="flips") -> tuple[str, ...]:
    """View names from a set name (``flips``, ``dihedral``), one name, a comma-separated
    string or a sequence of names; KitError on an unknown or repeated view."""
    if isinstance(views, str):
        if views in VIEW_SETS:
            return VIEW_SETS[views]
        views = [v.strip() for v in views.split(",") if v.strip()]
    names = tuple(_check(str(v)) for v in views)
    if not names:
        raise KitError("no TTA views given; use flips, dihedral or a list of views")
    if len(set(names)) != len(names):
        raise KitError(f"TTA views repeated in {', '.join(names)}; list each view once")
    return names
