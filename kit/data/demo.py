"""The demo dataset: :mod:`kit.data.synth`'s ``demo`` preset, in the exact challenge layout.

``./run.sh demo`` and the tests call :func:`generate`; the generator itself (images, planted
junk, class signal in the mask, held-back test labels) lives in :mod:`kit.data.synth`.
"""
from __future__ import annotations

from pathlib import Path

from kit.data import synth

# re-exported for the demo command and the tests
from kit.data.synth import JUNK_CSV, META_JSON, TEST_LABELS_CSV, make_plan  # noqa: F401

_DEMO = synth.PRESETS["demo"]


def generate(out_dir, n_train: int = _DEMO["n_train"], n_test: int = _DEMO["n_test"],
             short_side: int = _DEMO["short_side"], seed: int = 0, **options) -> Path:
    """Write the demo dataset under ``out_dir`` (a rerun with the same arguments reuses it).

    ``options`` are :func:`kit.data.synth.generate`'s (``n_cartoon``, ``n_green``,
    ``long_side_max``, ``signal``, ``label_noise``, ``test_labels``, ...).
    """
    args = synth.preset("demo", n_train=n_train, n_test=n_test, short_side=short_side,
                        seed=seed, **options)
    return synth.generate(out_dir, **args)
