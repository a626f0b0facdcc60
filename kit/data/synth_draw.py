"""The pixels of one planned image (:func:`draw`, for :mod:`kit.data.synth`): a light-grey scan
with curved H&E tissue strips, a mask of one to four regions inside them, the class's tumour
nuclei only inside the mask, scanner artefacts; a green splat or a cartoon for the junk.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from kit.data.synth_plan import Item
from kit.utils import check_random_state

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
        width = (half * (1 + 0.25 * np.sin(2 * np.pi * rng.uniform(1, 4) * x / w
                                           + rng.uniform(0, 6.3)))
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
            ear = (((x - cx - sx * 1.05 * rx) / (0.22 * rx)) ** 2
                   + ((y - cy + 0.2 * ry) / (0.12 * ry)) ** 2)
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
        mouth = np.abs(((x - cx) / (0.45 * rx)) ** 2
                       + ((y - cy - 0.3 * ry) / (0.2 * ry)) ** 2 - 1) < 0.12
        part[mouth & (y > cy + 0.3 * ry)] = skin * 0.4
    return img.astype(np.float32) + 2.0 * rng.standard_normal(img.shape, dtype=np.float32)
