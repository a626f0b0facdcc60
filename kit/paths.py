"""Where every stage reads and writes, relative to one work directory.

The default work directory is the repository root, giving ``folds/``, ``runs/`` and
``submissions/`` as in the README; the demo uses ``runs/demo`` so that it never touches a
tracked file.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    """File layout of one work directory."""

    root: Path

    @classmethod
    def from_root(cls, root: str | os.PathLike | None = None) -> "Paths":
        return cls(Path(root or os.environ.get("KIT_WORKDIR") or ".").resolve())

    @property
    def folds_dir(self) -> Path:
        return self.root / "folds"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def submissions_dir(self) -> Path:
        return self.root / "submissions"

    @property
    def outliers_csv(self) -> Path:
        return self.folds_dir / "outliers.csv"

    @property
    def overrides_csv(self) -> Path:
        return self.folds_dir / "overrides.csv"

    @property
    def folds_csv(self) -> Path:
        return self.folds_dir / "folds.csv"

    @property
    def groups_csv(self) -> Path:
        """Optional, user-edited: ``sample_index,group``; same group -> same fold."""
        return self.folds_dir / "groups.csv"

    @property
    def clean_dir(self) -> Path:
        return self.runs_dir / "clean"

    @property
    def patches_root(self) -> Path:
        """Holds one folder of patch caches per window size (``<size>px/``)."""
        return self.runs_dir / "patches"

    def patches_dir(self, split: str, size: int) -> Path:
        """The patch cache of ``split`` cut with ``size x size`` windows: caches of several
        sizes coexist (``kit.data.caches`` finds them)."""
        return self.patches_root / f"{int(size)}px" / split

    def backbone_dir(self, name: str) -> Path:
        """``runs/<name>/``: one cv run, named after its backbone unless ``cv --name`` gave
        another name (variants of one backbone side by side)."""
        return self.runs_dir / name

    def tune_dir(self, name: str) -> Path:
        return self.runs_dir / "tune" / name

    @property
    def features_dir(self) -> Path:
        return self.runs_dir / "features"


# runs/ sub-folders written by other stages: never cv runs, whatever they hold.
RESERVED_RUN_DIRS = frozenset({"blend", "tune", "patches", "clean", "features", "demo"})
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def check_run_name(name: str) -> str:
    """``name`` when it can name a folder under runs/, else a one-line KitError."""
    from kit.utils import KitError

    if not _RUN_NAME.match(str(name)) or name in RESERVED_RUN_DIRS:
        raise KitError(f"run name {name!r}: use letters, digits, '_', '-', '.' or '+', and "
                       f"none of {', '.join(sorted(RESERVED_RUN_DIRS))}")
    return str(name)
