"""The plan of a generated dataset: every image's drawn class, junk kind, mask source, size and
written label, decided before any pixel is drawn (:func:`make_plan`, for :mod:`kit.data.synth`).

Class counts default to the clean v2 training set's; junk rates are v2's (60 cartoons and 50
green splats in 691 training images).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from kit import CLASSES
from kit.utils import KitError, check_random_state

# Clean v2 training counts (581 images without the 110 junk ones).
CLEAN_COUNTS = {"Luminal A": 158, "Luminal B": 204, "HER2(+)": 150, "Triple negative": 69}
# v2 counts of the 631 training images that are not cartoons (clean + green): with the 30 + 30
# cartoon labels below they give train_labels.csv's counts exactly (LumA 205, LumB 220,
# HER2 189, TN 77 of 691).
V2_NONCARTOON_COUNTS = {"Luminal A": 175, "Luminal B": 220, "HER2(+)": 159, "Triple negative": 77}
# Cartoon labels are meaningless; in v2 they were half HER2(+), half Luminal A.
CARTOON_LABELS = ("HER2(+)", "Luminal A")
CARTOON_RATE = 60 / 691
GREEN_RATE = 50 / 691


@dataclass(frozen=True)
class Item:
    """One image to draw: split, index, drawn class, junk kind, mask source, size, written label."""

    split: str
    index: int
    label: str | None  # the class its pixels show
    kind: str  # "real" | "cartoon" | "green"
    host: int | None = None  # cartoon: index of the training image whose mask it reuses
    size: tuple[int, int] = (0, 0)  # (short, long)
    noisy: str | None = None  # label_noise: the written label, when it differs

    @property
    def name(self) -> str:
        return f"img_{self.index:04d}.png"

    @property
    def written(self) -> str | None:
        """The label written to the label files."""
        return self.noisy or self.label


def make_plan(n_train, n_test, short_side=256, seed=0, n_cartoon=None, n_green=None,
              long_side_max=None, n_test_green=1, class_counts=None,
              label_noise: float = 0.0) -> list[Item]:
    """Decide every image's label, junk kind, mask source and size (no pixels yet)."""
    if n_train < 1 or n_test < 0 or short_side < 32:
        raise KitError(f"synthetic data: need n_train >= 1, n_test >= 0, short_side >= 32 "
                       f"(got {n_train}, {n_test}, {short_side})")
    if not 0 <= label_noise < 1:
        raise KitError(f"synthetic data: label_noise must be in [0, 1) (got {label_noise!r})")
    counts = check_counts(CLEAN_COUNTS if class_counts is None else class_counts)
    small = n_train < 12
    n_cartoon = (n_train // 6 if small else max(2, round(CARTOON_RATE * n_train))) \
        if n_cartoon is None else n_cartoon
    n_green = (n_train // 6 if small else max(2, round(GREEN_RATE * n_train))) \
        if n_green is None else n_green
    if 2 * n_cartoon + n_green > n_train:
        raise KitError(f"synthetic data: {n_cartoon} cartoons need as many real mask hosts; "
                       f"with {n_green} green images that is more than n_train={n_train}")
    n_test_green = min(n_test_green, n_test)
    rng = check_random_state([seed, 7])

    order = rng.permutation(n_train)
    cartoons = sorted(order[:n_cartoon].tolist())
    greens = set(order[n_cartoon:n_cartoon + n_green].tolist())
    hosts = rng.permutation(order[n_cartoon + n_green:])[:n_cartoon].tolist()
    host_of = dict(zip(cartoons, hosts))

    real = [i for i in range(n_train) if i not in host_of]
    labels = dict(zip(real, _allocate(counts, len(real), rng)))
    cartoon_labels = [CARTOON_LABELS[k % 2] for k in range(n_cartoon)]
    labels.update(zip(cartoons, rng.permutation(cartoon_labels).tolist()))

    sizes = {(split, i): _size(rng, short_side, long_side_max)
             for split, n in (("train", n_train), ("test", n_test)) for i in range(n)}
    items = []
    for i in range(n_train):
        if i in host_of:
            items.append(Item("train", i, labels[i], "cartoon", host_of[i],
                              sizes[("train", host_of[i])]))
        else:
            items.append(Item("train", i, labels[i], "green" if i in greens else "real",
                              size=sizes[("train", i)]))
    test_greens = set(rng.permutation(n_test)[:n_test_green].tolist())
    # Test labels are hidden (unless test_labels) but still drawn, so test images carry signal.
    test_labels = _allocate(counts, n_test, rng)
    for i in range(n_test):
        items.append(Item("test", i, test_labels[i], "green" if i in test_greens else "real",
                          size=sizes[("test", i)]))
    return _add_label_noise(items, label_noise, seed) if label_noise else items


def check_counts(counts) -> dict:
    if not isinstance(counts, dict) or set(counts) != set(CLASSES) or not all(
            isinstance(v, (int, np.integer)) and v > 0 for v in counts.values()):
        raise KitError(f"synthetic data: class_counts must map each of {', '.join(CLASSES)} "
                       f"to a positive integer (got {counts!r})")
    return counts


def _add_label_noise(items: list[Item], rate: float, seed: int) -> list[Item]:
    """Replace the written label of about ``rate`` of the non-cartoon images by another class."""
    rng = check_random_state([seed, 11])  # its own stream: the rest of the plan is unchanged
    flip = rng.random(len(items)) < rate
    other = rng.integers(1, len(CLASSES), len(items))  # an offset: never the drawn class
    return [replace(it, noisy=CLASSES[(CLASSES.index(it.label) + o) % len(CLASSES)])
            if f and it.kind != "cartoon" else it for it, f, o in zip(items, flip, other)]


def _allocate(counts: dict, n: int, rng) -> list[str]:
    """``n`` labels in the proportions of ``counts`` (largest remainder), shuffled."""
    total = sum(counts.values())
    exact = {c: n * k / total for c, k in counts.items()}
    whole = {c: int(v) for c, v in exact.items()}
    short = n - sum(whole.values())
    for c in sorted(exact, key=lambda c: (whole[c] - exact[c], CLASSES.index(c)))[:short]:
        whole[c] += 1
    labels = [c for c in CLASSES for _ in range(whole[c])]
    return rng.permutation(labels).tolist()


def _size(rng, short: int, long_max: int | None) -> tuple[int, int]:
    long = int(round(short * rng.uniform(1.5, 4.0)))
    if long_max:
        long = max(short, min(long, long_max))
    return short, long
