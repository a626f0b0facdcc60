"""The kit's one synthetic-data generator: datasets in the challenge layout, patch caches, embeddings.

Used by ``./run.sh demo``, every ``./run.sh bench`` and the tests, so that class counts, junk and
class signal are defined once.

**Datasets** (:func:`generate`): each image is a low-magnification "scan": a light-grey
background with one to three curved H&E tissue strips (pink stroma, purple nuclei), and a
single-channel 0/255 mask with one to four regions inside the tissue. The class lives only
inside the mask: tumour nuclei there have a class-specific size, density and darkness (scaled
by ``signal``), while the tissue outside the mask (sparse spindle-shaped nuclei) is drawn the
same way for every class. Nuclei and strip widths are in pixels, as on the real 1024 px scans,
so 128 px top-mask-coverage patches see the signal while a whole-image resize or random
windows mostly see background and normal tissue (at small short sides the strips are
therefore relatively wider than on the real scans).

Planted junk, as in the real v2 training set: "cartoon" images (a yellow-green ogre face cut
into tissue-strip silhouettes) that reuse another training image's mask file byte for byte,
and real scans with one saturated green star-shaped splat. ``junk_truth.csv`` beside the
layout lists them. ``label_noise`` flips written labels (both splits, as annotation errors),
and ``test_labels=True`` writes the test labels to ``test_labels_heldout.csv`` at the root:
a file no stage of the kit reads, so that a benchmark can score test predictions.

**Presets** (:func:`preset`): ``demo`` (120/40 images, short side 256) and ``v2`` (the real
v2 counts: 691 training images with exactly its label counts, 60 cartoons, 50 green, 477
test images; 1024 x at most 1433 px).

**In memory** (tests and benches that skip the data stages): :func:`tinted_patches`
(patch arrays whose class is a colour tint), :func:`write_patch_workdir` (a work directory
with both patch caches and a folds file, in the formats of ``docs/DESIGN.md``) and
:func:`embeddings` (patch embeddings with a class signal).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from kit import CLASSES
from kit.utils import KitError, check_random_state, n_workers, progress

JUNK_CSV = "junk_truth.csv"
META_JSON = "demo.json"
TEST_LABELS_CSV = "test_labels_heldout.csv"
STYLES = ("scan", "plain")

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

PRESETS = {
    "demo": dict(n_train=120, n_test=40, short_side=256),
    # The real data's long side reaches 4200 px (train); 1433 keeps a full-scale set practical.
    "v2": dict(n_train=691, n_test=477, short_side=1024, long_side_max=1433, n_cartoon=60,
               n_green=50, class_counts=V2_NONCARTOON_COUNTS),
}

# Optical-density vectors (RGB) of haematoxylin and eosin: Macenko's reference stain matrix.
_HEMA = np.array([0.5626, 0.7201, 0.4062], np.float32)
_EOSIN = np.array([0.2159, 0.8012, 0.5581], np.float32)


@dataclass(frozen=True)
class Nuclei:
    """How nuclei look in a tissue type.

    ``sigma``: blob radius scale (px) across the strip, ``stretch``: elongation along it,
    ``cover``: area share, ``stain``: haematoxylin strength, ``eosin``: stroma eosin.
    """

    sigma: float
    cover: float
    stain: float
    eosin: float
    stretch: float = 1.0


# Tumour phenotype per class (inside the mask only): round nuclei whose size, density and
# darkness depend on the class. Sizes are in pixels, independent of the image size, so 128 px
# native patches see the same texture at any short side.
TUMOUR = {
    "Luminal A": Nuclei(sigma=1.1, cover=0.34, stain=0.85, eosin=0.45),  # small
    "Luminal B": Nuclei(sigma=1.7, cover=0.42, stain=1.10, eosin=0.38),  # medium, crowded
    "HER2(+)": Nuclei(sigma=2.8, cover=0.36, stain=0.70, eosin=0.55),  # large, pale
    "Triple negative": Nuclei(sigma=2.0, cover=0.55, stain=1.45, eosin=0.28),  # dense, dark
}
# Outside the mask, for every class: sparse spindle-shaped (stromal) nuclei.
NORMAL = Nuclei(sigma=0.8, cover=0.06, stain=0.90, eosin=0.50, stretch=2.8)
STRIP_HALF_PX = (28, 50)  # at a short side of 256; scaled by sqrt(short / 256)

_PNG = {"format": "PNG", "compress_level": 1, "optimize": False}  # fixed: byte-identical reruns


def preset(name: str, **overrides) -> dict:
    """The :func:`generate` arguments of preset ``name`` (``demo`` or ``v2``), with overrides."""
    if name not in PRESETS:
        raise KitError(f"unknown synthetic-data preset {name!r}; known: {', '.join(PRESETS)}")
    return {**PRESETS[name], **overrides}


def generate(out_dir, n_train: int = 120, n_test: int = 40, short_side: int = 256, seed: int = 0,
             n_cartoon: int | None = None, n_green: int | None = None,
             long_side_max: int | None = None, n_test_green: int = 1, *,
             class_counts: dict | None = None, signal: float = 1.0, label_noise: float = 0.0,
             test_labels: bool = False, style: str = "scan", workers: int = 0) -> Path:
    """Write a generated dataset in the challenge layout under ``out_dir`` and return ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Dataset root to create (``train_data/``, ``test_data/``, ``train_labels.csv``, plus
        ``junk_truth.csv`` and ``demo.json``). A rerun with the same arguments reuses the
        folder; an existing generated folder is replaced; any other folder is refused.
    n_train, n_test : int
        Number of training and test image/mask pairs.
    short_side : int
        Short image side in pixels; the long side is 1.5-4x that.
    seed : int
        Same seed and arguments give byte-identical files.
    n_cartoon, n_green : int, optional
        Planted junk in the training set (default: the v2 rates, 60 and 50 per 691, at least
        2 each when there are 12 or more training images).
    long_side_max : int, optional
        Cap on the long side.
    n_test_green : int
        Test images with a green splat (reported by the clean stage, never dropped).
    class_counts : dict, optional
        Class -> count whose shares the non-cartoon training images and the test images
        follow (default :data:`CLEAN_COUNTS`; the ``v2`` preset: exact v2 label counts).
    signal : float
        Strength of the class signal inside the masks: 1 as drawn by default, 0 none (every
        class the same tumour), in between or above scales the phenotypes' differences.
    label_noise : float
        Share of written labels (training and held-back test, not cartoons) replaced by
        another class at random; the pixels keep their drawn class.
    test_labels : bool
        Also write the test labels to ``test_labels_heldout.csv`` (never read by the kit).
    style : {"scan", "plain"}
        ``plain``: flat background and noisy flat-colour strips (no nuclei, no class signal,
        cheaper to decode than the real scans); for timing benchmarks.
    workers : int
        Drawing threads; 0 = one per available core.
    """
    out_dir = Path(out_dir)
    params = dict(n_train=n_train, n_test=n_test, short_side=short_side, seed=seed,
                  n_cartoon=n_cartoon, n_green=n_green, long_side_max=long_side_max,
                  n_test_green=n_test_green, version=_code_version())
    extra = dict(class_counts=class_counts, signal=signal, label_noise=label_noise,
                 test_labels=test_labels, style=style)
    # Recorded only when set, so a default dataset's demo.json keeps its fields.
    params.update({k: v for k, v in extra.items()
                   if v != {"signal": 1.0, "label_noise": 0.0, "test_labels": False,
                            "style": "scan"}.get(k)})
    if style not in STYLES:
        raise KitError(f"synthetic data: style must be one of {', '.join(STYLES)} (got {style!r})")
    if not (np.isfinite(signal) and signal >= 0):
        raise KitError(f"synthetic data: signal must be a number >= 0 (got {signal!r})")
    if _up_to_date(out_dir, params):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / META_JSON).exists():
        raise KitError(f"{out_dir}: exists and is not a generated dataset (no {META_JSON}); "
                       "choose another folder or delete it")
    plan = make_plan(n_train, n_test, short_side, seed, n_cartoon, n_green, long_side_max,
                     n_test_green, class_counts=class_counts, label_noise=label_noise)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is not
    try:
        _write_all(tmp, plan, seed, workers, signal=signal, style=style,
                   test_labels=test_labels)
        (tmp / META_JSON).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def read_test_labels(root) -> pd.DataFrame:
    """The held-back test labels of a dataset generated with ``test_labels=True``."""
    path = Path(root) / TEST_LABELS_CSV
    if not path.is_file():
        raise KitError(f"{path}: not found; generate the data with test_labels=True")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


# ---------------------------------------------------------------------------------------------
# Plan: who is what


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
    counts = _check_counts(CLEAN_COUNTS if class_counts is None else class_counts)
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


def _check_counts(counts) -> dict:
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
    for c in sorted(exact, key=lambda c: (whole[c] - exact[c], CLASSES.index(c)))[:n - sum(whole.values())]:
        whole[c] += 1
    labels = [c for c in CLASSES for _ in range(whole[c])]
    return rng.permutation(labels).tolist()


def _size(rng, short: int, long_max: int | None) -> tuple[int, int]:
    long = int(round(short * rng.uniform(1.5, 4.0)))
    if long_max:
        long = max(short, min(long, long_max))
    return short, long


# ---------------------------------------------------------------------------------------------
# Writing


def _write_all(root: Path, plan: list[Item], seed: int, workers: int = 0, signal: float = 1.0,
               style: str = "scan", test_labels: bool = False) -> None:
    for split in ("train", "test"):
        (root / f"{split}_data").mkdir(parents=True)
    work = partial(_write_one, root=root, seed=seed, signal=signal, style=style)
    workers = n_workers(workers)
    bar = dict(total=len(plan), desc="synthetic data", unit="img")
    if workers <= 1 or len(plan) < 32:
        for item in progress(plan, **bar):
            work(item)
    else:
        # threads: numpy, scipy and zlib release the GIL for the heavy parts
        with ThreadPoolExecutor(workers) as pool:
            for _ in progress(pool.map(work, plan), **bar):
                pass
    for item in plan:  # cartoons copy their host's mask file byte for byte
        if item.kind == "cartoon":
            folder = root / "train_data"
            shutil.copyfile(folder / f"mask_{item.host:04d}.png",
                            folder / item.name.replace("img_", "mask_"))
    for split, name in (("train", "train_labels.csv"), ("test", TEST_LABELS_CSV)):
        if split == "test" and not test_labels:
            continue
        rows = [it for it in plan if it.split == split]
        labels = pd.DataFrame({"sample_index": [it.name for it in rows],
                               "label": [it.written for it in rows]})
        labels.to_csv(root / name, index=False, lineterminator="\n")
    junk = pd.DataFrame([{"split": it.split, "sample_index": it.name, "kind": it.kind,
                          "mask_of": f"img_{it.host:04d}.png" if it.host is not None else ""}
                         for it in plan if it.kind != "real"],
                        columns=["split", "sample_index", "kind", "mask_of"])
    junk.to_csv(root / JUNK_CSV, index=False, lineterminator="\n")


def _write_one(item: Item, root: Path, seed: int, signal: float = 1.0,
               style: str = "scan") -> None:
    img, mask = draw(item, seed, signal, style)
    folder = root / f"{item.split}_data"
    (folder / item.name).write_bytes(_png(img))
    if item.kind != "cartoon":  # cartoons get their host's mask file afterwards
        (folder / item.name.replace("img_", "mask_")).write_bytes(_png(mask))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, **_PNG)
    return buf.getvalue()


def _code_version() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def _up_to_date(out_dir: Path, params: dict) -> bool:
    meta = out_dir / META_JSON
    try:
        return json.loads(meta.read_text()) == json.loads(json.dumps(params))
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# Drawing one image


def phenotypes(signal: float = 1.0) -> dict[str, Nuclei]:
    """Tumour nuclei per class, their differences scaled by ``signal`` (0: all alike)."""
    if signal == 1.0:
        return TUMOUR  # exactly as drawn by default (no rounding from the scaling below)
    fields = ("sigma", "cover", "stain", "eosin")
    mean = {f: float(np.mean([getattr(n, f) for n in TUMOUR.values()])) for f in fields}
    # Clipped so that a strong signal still gives valid nuclei (positive size, cover < 0.9).
    low = {"sigma": 0.5, "cover": 0.05, "stain": 0.1, "eosin": 0.05}
    high = {"sigma": 6.0, "cover": 0.85, "stain": 2.5, "eosin": 1.0}
    return {c: Nuclei(**{f: float(np.clip(mean[f] + signal * (getattr(n, f) - mean[f]),
                                          low[f], high[f])) for f in fields})
            for c, n in TUMOUR.items()}


def draw(item: Item, seed: int, signal: float = 1.0,
         style: str = "scan") -> tuple[np.ndarray, np.ndarray]:
    """Pixels of one planned image: (uint8 H x W x 3 RGB, uint8 H x W mask of 0/255)."""
    split_code = 0 if item.split == "train" else 1
    geo_index = item.host if item.kind == "cartoon" else item.index
    # Geometry comes from the mask's owner so that a cartoon matches its host's silhouette.
    geo = _geometry(check_random_state([seed, split_code, geo_index, 0]), *item.size)
    rng = check_random_state([seed, split_code, item.index, 1])
    plain = style == "plain"
    img = _background(rng, geo.alpha.shape, flat=plain)
    inside = geo.alpha > 0  # colour maths only where there is tissue (a fifth of the image)
    if item.kind == "cartoon":
        front = _cartoon(rng, geo.alpha.shape)[inside]
    elif plain:
        colour = rng.uniform((150, 60, 140), (220, 130, 200)).astype(np.float32)
        front = colour + 18 * rng.standard_normal((int(inside.sum()), 3), dtype=np.float32)
    else:
        front = _tissue(rng, geo.mask, inside, phenotypes(signal)[item.label])
    a = geo.alpha[inside][:, None]
    img[inside] = img[inside] * (1 - a) + front * a
    if item.kind != "cartoon":
        if not plain:
            _decorate(rng, img, geo)
        if item.kind == "green":
            _splat(rng, img, geo)
    np.clip(img, 0, 255, out=img)  # in place: a full-size scan is 17 MB of float32
    img = np.rint(img, out=img).astype(np.uint8)
    mask = np.where(geo.mask, 255, 0).astype(np.uint8)
    return geo.orient(img), geo.orient(mask)


@dataclass
class _Geometry:
    alpha: np.ndarray  # float32 tissue opacity, landscape (short x long)
    mask: np.ndarray  # bool, inside tissue
    strips: list  # (centre y per column, half width per column, x0, x1)
    transpose: bool
    flip: tuple[bool, bool]

    def orient(self, arr: np.ndarray) -> np.ndarray:
        """Turn a landscape array into the image's final orientation."""
        if self.flip[0]:
            arr = arr[::-1]
        if self.flip[1]:
            arr = arr[:, ::-1]
        if self.transpose:
            arr = arr.swapaxes(0, 1)
        return np.ascontiguousarray(arr)


def _geometry(rng, short: int, long: int) -> _Geometry:
    """Tissue strips (curved bands along the long axis) and mask regions inside them."""
    h, w = short, long
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)
    n = int(rng.choice([1, 2, 3], p=[0.4, 0.45, 0.15]))
    dist = np.full((h, w), np.inf, np.float32)  # |dy| - half width: < 0 inside a strip
    strips = []
    band = h / n
    for k in range(n):
        # Half widths in pixels, not in image shares: like the real 1024 px scans (strips
        # ~110-200 px wide), a 128 px window on a strip is mostly tissue.
        half = min(rng.uniform(*STRIP_HALF_PX) * np.sqrt(h / 256), band / 3.0, 0.2 * h)
        amp = rng.uniform(0.2, 1.0) * max(2.0, band / 2 - 1.2 * half)
        y0 = band * (k + 0.5) + rng.uniform(-0.1, 0.1) * band
        centre = (y0 + amp * np.sin(2 * np.pi * rng.uniform(0.3, 1.4) * x / w + rng.uniform(0, 6.3))
                  + 0.3 * amp * np.sin(2 * np.pi * rng.uniform(1.5, 3.0) * x / w
                                       + rng.uniform(0, 6.3)))
        centre = np.clip(centre, min(1.3 * half + 2, h / 2), max(h - 1.3 * half - 2, h / 2))
        x0, x1 = w * rng.uniform(0, 0.15), w * (1 - rng.uniform(0, 0.15))
        ends = np.clip(np.minimum(x - x0, x1 - x) / (2 * half), 0, 1)
        slope = np.gradient(centre)
        width = (half * (1 + 0.25 * np.sin(2 * np.pi * rng.uniform(1, 4) * x / w + rng.uniform(0, 6.3)))
                 * np.sqrt(ends) * np.sqrt(1 + slope ** 2))
        width[ends <= 0] = -h  # beyond the ends: no tissue, whatever the edge noise
        dist = np.minimum(dist, np.abs(y - centre[None]) - width[None])
        strips.append((centre, width, x0, x1))
    dist += _smooth_noise(rng, (h, w), max(6, h // 40)) * min(3.0, 0.01 * h)  # ragged edges
    alpha = np.clip(0.5 - dist, 0, 1)
    mask = _mask_regions(rng, strips, alpha > 0.5, y, x)
    return _Geometry(alpha, mask, strips, bool(rng.random() < 0.5),
                     (bool(rng.random() < 0.5), bool(rng.random() < 0.5)))


def _mask_regions(rng, strips, tissue, y, x) -> np.ndarray:
    """1-4 blob-shaped regions that follow a strip's curve, clipped to the tissue."""
    h, w = tissue.shape
    mask = np.zeros((h, w), bool)
    wobble = _smooth_noise(rng, (h, w), max(8, h // 32))
    for _ in range(int(rng.integers(1, 5))):
        centre, width, x0, x1 = strips[int(rng.integers(len(strips)))]
        xc = rng.uniform(x0 + 0.1 * (x1 - x0), x1 - 0.1 * (x1 - x0))
        half = max(float(width[int(xc)]), 2.0)
        a = half * rng.uniform(1.5, 4.5)  # along the strip
        b = half * rng.uniform(0.9, 1.5)  # across: often the strip's full width
        off = rng.uniform(-0.3, 0.3) * half
        lo, hi = max(0, int(xc - 1.5 * a)), min(w, int(xc + 1.5 * a) + 1)
        r = ((x[lo:hi] - xc) / a) ** 2 + ((y - centre[None, lo:hi] - off) / b) ** 2
        mask[:, lo:hi] |= r < (1 + 0.25 * wobble[:, lo:hi]) ** 2
    mask &= tissue
    if not mask.any():  # a region fell on a tapered end: put one on the widest point
        centre, width, _, _ = strips[0]
        xc = int(np.argmax(width))
        mask[:, max(0, xc - 4):xc + 5] = tissue[:, max(0, xc - 4):xc + 5]
    return mask


def _smooth_noise(rng, shape, cell_y: int, cell_x: int | None = None) -> np.ndarray:
    """Smooth unit-ish noise: a coarse Gaussian grid upsampled bicubically."""
    h, w = shape
    cell_x = cell_x or cell_y
    grid = rng.standard_normal((h // cell_y + 2, w // cell_x + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32)


def _background(rng, shape, flat: bool = False) -> np.ndarray:
    """Light-grey glass (RGB ~200-230) with a faint colour cast and uneven illumination."""
    h, w = shape
    level = rng.uniform(205, 225) + rng.uniform(-3, 3, 3)
    if flat:
        return np.broadcast_to(level.astype(np.float32), (h, w, 3)).copy()
    light = 3.0 * _smooth_noise(rng, shape, max(8, h // 3))
    return (level[None, None, :] + light[..., None]).astype(np.float32)


def _nuclei(rng, shape, kind: Nuclei, where: np.ndarray | None = None) -> np.ndarray:
    """Soft nuclei map in [0, 1]: random points blurred into blobs of radius ~1.2 sigma.

    With ``where`` (bool, ``shape``), only the map's values at ``where`` are meant to be used:
    the blur then runs on the bounding box of ``where`` plus the blur's reach (the same
    values there, for a fraction of the work when ``where`` is small, such as a mask).
    """
    sy = kind.sigma * rng.uniform(0.92, 1.08)
    sx = sy * kind.stretch
    cover = np.clip(kind.cover + rng.uniform(-0.02, 0.02), 0.01, 0.9)
    p = -np.log(1 - cover) / (np.pi * 1.18 ** 2 * sy * sx)  # Poisson points -> covered share
    draws = rng.random(shape, dtype=np.float32)  # all of them: the stream stays the same
    box = (slice(None), slice(None))
    if where is not None and where.any():
        # gaussian_filter reaches int(4 sigma + 0.5) px (truncate=4): inside that margin of
        # the box's edges every value is computed from the same inputs as on the whole image.
        box = tuple(slice(max(0, int(idx.min()) - reach), int(idx.max()) + 1 + reach)
                    for idx, reach in zip(np.nonzero(where.any(axis=1))
                                          + np.nonzero(where.any(axis=0)),
                                          (int(4 * sy + 0.5) + 1, int(4 * sx + 0.5) + 1)))
    points = (draws[box] < p).astype(np.float32)
    field = ndimage.gaussian_filter(points, (sy, sx), mode="reflect") * (2 * np.pi * sy * sx)
    out = np.zeros(shape, np.float32) if box[0] != slice(None) else None
    field = np.clip((field - 0.35) / 0.3, 0, 1)
    if out is None:
        return field
    out[box] = field
    return out


def _tissue(rng, mask: np.ndarray, inside: np.ndarray, tumour: Nuclei) -> np.ndarray:
    """H&E colours (Beer-Lambert) of the ``inside`` pixels, as N x 3; tumour only in the mask."""
    shape = mask.shape
    batch_h, batch_e = rng.uniform(0.9, 1.1, 2)  # staining batch: class-independent
    stain_t = tumour.stain * rng.uniform(0.95, 1.05)
    eosin_t = tumour.eosin + rng.uniform(-0.03, 0.03)
    nuc_t = _nuclei(rng, shape, tumour, where=mask)[inside]  # used in the mask only
    nuc_n = _nuclei(rng, shape, NORMAL)[inside]
    fibres = _smooth_noise(rng, shape, 2, 9)[inside]  # stroma streaks along the strip
    mottle = _smooth_noise(rng, shape, 3)[inside]
    m = mask[inside]
    nuc = np.where(m, nuc_t, nuc_n)
    conc_h = batch_h * (0.1 + nuc * np.where(m, stain_t, NORMAL.stain) * (1 + 0.1 * mottle))
    conc_e = batch_e * np.where(m, eosin_t, NORMAL.eosin) * (1 + 0.18 * fibres) * (1 - 0.4 * nuc)
    od = conc_h[:, None] * _HEMA + conc_e[:, None] * _EOSIN
    light = rng.uniform(228, 242)
    return light * np.exp(-od) + 3.0 * rng.standard_normal(od.shape, dtype=np.float32)


def _decorate(rng, img: np.ndarray, geo: _Geometry) -> None:
    """Scanner artefacts seen on the real scans: a dark edge band, a blue pen mark."""
    h, w = geo.alpha.shape
    if rng.random() < 0.12:
        width = h * rng.uniform(0.02, 0.06)
        rows = np.arange(h, dtype=np.float32)
        dist = rows if rng.random() < 0.5 else (h - 1 - rows)
        a = np.clip((width - dist) / 2, 0, 1)[:, None, None]
        band = np.flatnonzero(a[:, 0, 0] > 0)  # rows with a = 0 would stay as they are
        img[band] = img[band] * (1 - a[band]) + rng.uniform(55, 95) * a[band]
    if rng.random() < 0.12:
        x = np.arange(w, dtype=np.float32)
        y = np.arange(h, dtype=np.float32)[:, None]
        x0 = rng.uniform(0, 0.7) * w
        x1 = x0 + rng.uniform(0.1, 0.3) * w
        line = (rng.uniform(0.1, 0.9) * h
                + 0.08 * h * np.sin(2 * np.pi * x / (0.3 * w) + rng.uniform(0, 6.3)))
        thick = max(1.5, 0.012 * h)
        a = np.clip(thick - np.abs(y - line[None]), 0, 1) * ((x >= x0) & (x <= x1))[None]
        img[:] = img * (1 - 0.85 * a[..., None]) + 0.85 * a[..., None] * np.array(
            [35, 45, 110], np.float32)


def _splat(rng, img: np.ndarray, geo: _Geometry) -> None:
    """One saturated green star-shaped blot with a lighter rim, ~1/10 of the image across."""
    h, w = geo.alpha.shape
    radius = min(w * rng.uniform(0.04, 0.07), 0.42 * h)
    centre, width, x0, x1 = geo.strips[int(rng.integers(len(geo.strips)))]
    cx = rng.uniform(x0, x1)
    col = min(w - 1, int(cx))
    cy = centre[col] + rng.uniform(-1.5, 1.5) * max(float(width[col]), 0.0)  # on or next to it
    lo_x, hi_x = max(0, int(cx - 1.6 * radius)), min(w, int(cx + 1.6 * radius) + 1)
    lo_y, hi_y = max(0, int(cy - 1.6 * radius)), min(h, int(cy + 1.6 * radius) + 1)
    if lo_x >= hi_x or lo_y >= hi_y:
        cy = float(np.clip(cy, 0, h - 1))
        lo_y, hi_y = max(0, int(cy - 1.6 * radius)), min(h, int(cy + 1.6 * radius) + 1)
    yy, xx = np.mgrid[lo_y:hi_y, lo_x:hi_x].astype(np.float32)
    theta = np.arctan2(yy - cy, xx - cx)
    spikes = int(rng.integers(5, 10))
    edge = radius * (1 + rng.uniform(0.25, 0.4) * np.sin(spikes * theta + rng.uniform(0, 6.3))
                     + 0.1 * np.sin((spikes + 3) * theta + rng.uniform(0, 6.3)))
    t = np.hypot(yy - cy, xx - cx) / edge
    mottle = _smooth_noise(rng, t.shape, 3)
    core = np.stack([28 + 6 * mottle, 205 + 8 * mottle, 38 + 6 * mottle], -1)
    rim = np.array([140, 248, 125], np.float32)
    colour = np.where((t < 0.78)[..., None], core, rim)
    a = np.clip((1 - t) * radius / 1.5, 0, 1)[..., None]
    region = img[lo_y:hi_y, lo_x:hi_x]
    region[:] = region * (1 - a) + colour * a


def _cartoon(rng, shape) -> np.ndarray:
    """A "Shrek"-like picture: yellow-green faces on dark-green and brown surroundings."""
    h, w = shape
    variant = rng.choice(["classic", "orange", "bright"], p=[0.7, 0.15, 0.15])
    skin = {"classic": (168, 186, 72), "orange": (214, 150, 72), "bright": (112, 212, 64)}[variant]
    skin = np.array(skin, np.float32) + rng.uniform(-8, 8, 3)
    forest = np.array([42, 74, 34], np.float32) + rng.uniform(-6, 6, 3)
    brown = np.array([112, 72, 38], np.float32) + rng.uniform(-6, 6, 3)
    img = np.where((_smooth_noise(rng, shape, max(4, h // 5)) > 0.6)[..., None], brown, forest)
    img *= 1 + 0.12 * _smooth_noise(rng, shape, 6)[..., None]
    y = np.arange(h, dtype=np.float32)[:, None]
    n_faces = max(1, int(round(w / (1.6 * h))))
    for k in range(n_faces):
        cx = w * (k + 0.5) / n_faces + rng.uniform(-0.1, 0.1) * w / n_faces
        cy = h * rng.uniform(0.4, 0.6)
        ry = h * rng.uniform(0.35, 0.5)
        rx = ry * rng.uniform(0.85, 1.1)
        lo, hi = max(0, int(cx - 1.4 * rx)), min(w, int(cx + 1.4 * rx) + 1)
        x = np.arange(lo, hi, dtype=np.float32)[None, :]
        part = img[:, lo:hi]  # a view: drawing into it draws into img
        for sx in (-1, 1):  # trumpet ears
            ear = ((x - cx - sx * 1.05 * rx) / (0.22 * rx)) ** 2 + ((y - cy + 0.2 * ry) / (0.12 * ry)) ** 2
            part[ear < 1] = skin * 0.85
        r2 = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
        face = r2 < 1
        part[face] = skin * np.clip(1.05 - 0.3 * r2[face], 0.7, 1.05)[:, None]
        for sx in (-1, 1):
            ex, ey = cx + sx * 0.35 * rx, cy - 0.15 * ry
            part[((x - ex) / (0.16 * rx)) ** 2 + ((y - ey) / (0.11 * ry)) ** 2 < 1] = 232
            part[((x - ex) / (0.07 * rx)) ** 2 + ((y - ey) / (0.07 * ry)) ** 2 < 1] = brown * 0.6
            brow = (np.abs(y - (ey - 0.17 * ry) - 0.15 * sx * (x - ex)) < 0.03 * ry) & (
                np.abs(x - ex) < 0.18 * rx)
            part[brow] = skin * 0.45
        mouth = np.abs(((x - cx) / (0.45 * rx)) ** 2 + ((y - cy - 0.3 * ry) / (0.2 * ry)) ** 2 - 1) < 0.12
        part[mouth & (y > cy + 0.3 * ry)] = skin * 0.4
    return img.astype(np.float32) + 2.0 * rng.standard_normal(img.shape, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# In memory: patch caches, folds and embeddings without the data stages

# Per-class RGB offsets added to grey noise: easy to learn, invariant to flips and rotations.
TINTS = np.array([[60, -30, -30], [-30, 60, -30], [-30, -30, 60], [-40, -40, -40]])


def tinted_patches(n: int, k: int, size: int, labels, rng, signal: float = 1.0) -> np.ndarray:
    """Patches (uint8 ``n x k x size x size x 3``): grey noise plus a class tint x ``signal``.

    ``labels`` are class indices; a tiny CNN learns the tint in a few epochs.
    """
    rng = check_random_state(rng)
    base = rng.normal(140, 30, size=(n, k, size, size, 3))
    base += signal * TINTS[np.asarray(labels)][:, None, None, None, :]
    return np.clip(base, 0, 255).astype(np.uint8)


def stratified_folds(y, n_folds: int, rng=None) -> np.ndarray:
    """Fold per row: each class's rows dealt round-robin (shuffled first when ``rng`` is given)."""
    y = np.asarray(y)
    fold = np.zeros(len(y), dtype=np.int64)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if rng is not None:
            members = check_random_state(rng).permutation(members)
        fold[members] = np.arange(len(members)) % n_folds
    return fold


def write_patch_cache(out: Path, ids, labels, array: np.ndarray, key: str) -> None:
    """A patch cache folder as ``kit.data.patches`` writes it (``patches.npy``, CSVs, meta)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "patches.npy", array)
    pd.DataFrame({"sample_index": ids, "label": labels, "fallback": False}).to_csv(
        out / "samples.csv", index=False)
    n, k = array.shape[:2]
    pd.DataFrame({"sample_index": np.repeat(ids, k), "patch": np.tile(np.arange(k), n),
                  "x": 0, "y": 0, "coverage": 1.0}).to_csv(out / "index.csv", index=False)
    (out / "meta.json").write_text(json.dumps({"key": key, "shape": list(array.shape)}))
    (out / "config.yaml").write_text(f"size: {array.shape[2]}\ntop_k: {k}\n")


def write_folds(paths, ids, labels, fold) -> None:
    """``folds/folds.csv`` (sorted by sample_index) as ``kit.data.folds`` writes it."""
    paths.folds_dir.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"sample_index": ids, "label": labels, "fold": fold})
    df.sort_values("sample_index").to_csv(paths.folds_csv, index=False, lineterminator="\n")


def write_patch_workdir(root, n_train: int = 24, n_test: int = 8, k: int = 4, size: int = 32,
                        n_folds: int = 3, seed: int = 0, signal: float = 1.0):
    """A work directory with tinted patch caches and a stratified folds file; its ``Paths``.

    Training labels cycle through the classes (balanced); test labels are random. The cv
    stage runs on it without the data stages.
    """
    from kit.paths import Paths

    rng = np.random.default_rng(seed)
    paths = Paths.from_root(root)
    y = np.arange(n_train) % len(CLASSES)
    ids = [f"img_{i:04d}.png" for i in range(n_train)]
    labels = [CLASSES[c] for c in y]
    write_patch_cache(paths.patches_dir("train", size), ids, labels,
                      tinted_patches(n_train, k, size, y, rng, signal), key=f"train-{seed}")
    yt = rng.integers(0, len(CLASSES), n_test)
    write_patch_cache(paths.patches_dir("test", size), [f"img_{i:04d}.png" for i in range(n_test)],
                      [""] * n_test, tinted_patches(n_test, k, size, yt, rng, signal),
                      key=f"test-{seed}")
    write_folds(paths, ids, labels, stratified_folds(y, n_folds))
    return paths


def embeddings(n: int, k: int, n_views: int, dim: int, seed: int = 0,
               counts: dict | None = None, signal: float = 0.06):
    """Patch embeddings with a class signal: ``(x float16 n x k x n_views x dim, y)``.

    Class means (scale ``signal``) plus a per-image offset plus per-patch noise; labels drawn
    with the shares of ``counts`` (default: the clean v2 training counts).
    """
    rng = np.random.default_rng(seed)
    counts = _check_counts(CLEAN_COUNTS if counts is None else counts)
    share = np.array([counts[c] for c in CLASSES], dtype=float)
    y = rng.choice(len(CLASSES), size=n, p=share / share.sum())
    means = rng.normal(0, signal, (len(CLASSES), dim))
    x = (means[y][:, None, None, :] + rng.normal(0, 0.5, (n, 1, 1, dim))
         + rng.normal(0, 1.0, (n, k, n_views, dim))).astype(np.float16)
    return x, y
