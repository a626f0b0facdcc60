"""Which patch cache a stage reads: caches of several window sizes coexist, one per size.

``./run.sh patches`` writes ``runs/patches/<size>px/<split>/`` (``kit.paths.Paths.patches_dir``).
A backbone trains on the only cache there is; with several, on the one of its native size
(``kit.models.backbones.native_size``) or the size asked for (train.yaml ``patches_size``).
Anything else is a one-line ``KitError`` naming the ``./run.sh patches`` command to run.
Caches written before sizes had folders (``runs/patches/<split>/``) are moved into theirs by
the next ``./run.sh patches`` of that size (:func:`adopt_legacy`).
"""
from __future__ import annotations

import json
import os
import re

from kit.utils import KitError

_SIZE_DIR = re.compile(r"^(\d+)px$")


def cached_sizes(paths) -> list[int]:
    """Window sizes with a finished cache of at least one split (``meta.json`` written),
    ascending."""
    root = paths.patches_root
    if not root.is_dir():
        return []
    sizes = []
    for child in root.iterdir():
        m = _SIZE_DIR.match(child.name)
        if m and any((child / split / "meta.json").is_file() for split in ("train", "test")):
            sizes.append(int(m.group(1)))
    return sorted(sizes)


def patches_command(backbone: str | None = None, size: int | None = None) -> str:
    """The ``./run.sh patches`` command that builds the cache a message asks for."""
    if size is not None:
        return f"./run.sh patches --size {int(size)}"
    return "./run.sh patches" + (f" --backbone {backbone}" if backbone else "")


def _legacy_hint(paths) -> str:
    old = paths.patches_root / "train" / "meta.json"
    if not old.is_file():
        return ""
    return (f" (a cache in the old layout is at {old.parent}: ./run.sh patches with its size "
            "moves it into place)")


def pick_size(paths, native: int | None = None, size="auto", backbone: str | None = None) -> int:
    """The window size of the cache to read.

    Parameters
    ----------
    paths : kit.paths.Paths
    native : int, optional
        The backbone's native input size; chooses among several caches.
    size : "auto" or int
        ``auto``: the only cache, else the one of ``native`` size; a number: that size.
    backbone : str, optional
        Named in the error messages.

    Raises
    ------
    KitError
        No cache, no cache of the size asked for, or several and none chosen.
    """
    sizes = cached_sizes(paths)
    have = ", ".join(f"{s} px" for s in sizes) or "none"
    if str(size).strip().lower() != "auto":
        try:
            want = int(size)
        except (TypeError, ValueError):
            raise KitError(f"patches_size must be auto or a window size in pixels "
                           f"(got {size!r})") from None
        if want not in sizes:
            raise KitError(f"no {want} px patch cache under {paths.patches_root} (cached: {have});"
                           f" run {patches_command(size=want)}{_legacy_hint(paths)}")
        return want
    if not sizes:
        raise KitError(f"no patch cache under {paths.patches_root}; run "
                       f"{patches_command(backbone)}{_legacy_hint(paths)}")
    if len(sizes) == 1:
        return sizes[0]
    if native is not None and int(native) in sizes:
        return int(native)
    who = f"{backbone}'s native size" if backbone else "the size wanted"
    if native is None:
        raise KitError(f"patch caches of {have} exist under {paths.patches_root}; say which: "
                       f"--set patches_size=<px> (train.yaml)")
    raise KitError(f"patch caches of {have} exist but none of {int(native)} px ({who}); run "
                   f"{patches_command(backbone)}, or pick one with --set patches_size="
                   f"{sizes[0]}")


def adopt_legacy(paths, split: str, size: int) -> bool:
    """Move a cache of the old layout (``runs/patches/<split>/``) to its size's folder when it
    was cut with ``size`` windows and that folder is free; True when moved."""
    old = paths.patches_root / split
    new = paths.patches_dir(split, size)
    try:
        meta = json.loads((old / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    if int((meta.get("config") or {}).get("size", -1)) != int(size) or new.exists():
        return False
    new.parent.mkdir(parents=True, exist_ok=True)
    os.replace(old, new)
    return True

