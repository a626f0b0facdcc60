"""Tiny inputs of the cv stage, written straight in the formats of docs/DESIGN.md.

Thin names over :mod:`kit.data.synth` (the kit's one synthetic-data generator): ``make_workdir``
writes ``runs/patches/<size>px/{train,test}/`` and ``folds/folds.csv`` with a class signal a tiny CNN
learns in a few epochs (each class tints its patches a different way), so tests of training,
cv and the demo do not depend on the data stages.
"""
from __future__ import annotations

from kit.data.synth import TINTS, tinted_patches, write_folds, write_patch_cache  # noqa: F401
from kit.data.synth import write_patch_workdir as make_workdir  # noqa: F401

make_patches = tinted_patches
