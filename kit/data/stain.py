"""Stain normalisation of H&E patches: Macenko et al. (2009) through torchstain's numpy backend.

Slides from different labs and scanners differ in how much haematoxylin (nuclei, blue-purple)
and eosin (cytoplasm and stroma, pink) they took up and in the scanner's colour response.
Macenko's method works in optical density (OD = -log(I / Io)), where stains add linearly:
it finds the plane of the two main directions of the tissue pixels' OD, takes the extreme
angles in that plane (robust percentiles ``alpha`` and ``100 - alpha``) as the haematoxylin
and eosin vectors, solves every pixel's two stain concentrations, scales them so that their
99th percentiles match the reference, and re-renders the pixels with the reference vectors.

:mod:`kit.data.patches` applies it per image when ``stain_norm.method`` is ``macenko`` in
``kit/conf/patches.yaml``: the stains are estimated from the image's K patches together (more
tissue pixels than one patch, so a steadier estimate, and one colour mapping per image) and
every patch of train and test is re-rendered with the same reference.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kit.data.dataset import read_image
from kit.utils import KitError, sha256_file

# Macenko's reference stain vectors (columns: haematoxylin, eosin; rows: R, G, B optical
# densities) and maximal concentrations: torchstain's defaults, used when reference is "".
STANDARD_HE = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
STANDARD_MAX_C = (1.9705, 1.0308)
MIN_TISSUE_PIXELS = 64


def check_stain_config(cfg: dict, source: str = "patches.yaml") -> dict:
    """KitError unless the ``stain_norm`` reference image exists (its values were checked by
    kit.schema when the command loaded patches.yaml)."""
    if cfg["method"] != "none" and cfg["reference"] and not Path(cfg["reference"]).is_file():
        raise KitError(f"{source}: stain_norm.reference {cfg['reference']} not found; give an "
                       "RGB image file, or \"\" for Macenko's standard reference stains")
    return cfg


def stain_key(cfg: dict | None) -> dict | None:
    """What of ``stain_norm`` changes the patches (for the patch cache key), or ``None`` when off.

    The reference enters by content (sha256), not by path: moving the file does not rebuild.
    """
    if cfg is None or cfg["method"] == "none":
        return None
    key = {k: cfg[k] for k in ("method", "intensity", "alpha", "beta", "min_tissue")}
    key["reference"] = sha256_file(cfg["reference"]) if cfg["reference"] else "macenko-standard"
    return key


def stain_payload(cfg: dict | None) -> dict | None:
    """The resolved settings a patch worker needs (reference stains fitted once), or ``None``."""
    if cfg is None or cfg["method"] == "none":
        return None
    check_stain_config(cfg)
    params = {k: float(cfg[k]) for k in ("intensity", "alpha", "beta", "min_tissue")}
    if cfg["reference"]:
        he, max_c = macenko_reference(read_image(cfg["reference"]), params["intensity"],
                                      params["alpha"], params["beta"], params["min_tissue"],
                                      name=cfg["reference"])
    else:
        he, max_c = np.array(STANDARD_HE), np.array(STANDARD_MAX_C)
    return {"method": cfg["method"], **params, "he": np.asarray(he).tolist(),
            "max_c": np.asarray(max_c).tolist()}


def _normalizer(he=STANDARD_HE, max_c=STANDARD_MAX_C):
    """torchstain's numpy Macenko normaliser, targeting ``he`` / ``max_c``, with a fast solve."""
    # Here: torchstain is needed only with stain normalisation on.
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    class Normalizer(NumpyMacenkoNormalizer):
        # torchstain solves every pixel's two concentrations with np.linalg.lstsq over all
        # pixels at once: an SVD-based solver that takes ~250 ms for one image's 12 patches
        # of 128 px, 10x the rest of the method. HE (3 x 2) has full column rank, so the
        # least-squares solution is exactly pinv(HE) @ OD: a 2 x 3 matrix product (the test
        # suite checks that the output equals torchstain's own). The name is torchstain's
        # private method as Python mangles it (torchstain is pinned).
        def _NumpyMacenkoNormalizer__find_concentration(self, OD, HE):  # noqa: N802
            return np.linalg.pinv(HE) @ np.reshape(OD, (-1, 3)).T

    norm = Normalizer()
    norm.HERef = np.asarray(he, dtype=np.float64)
    norm.maxCRef = np.asarray(max_c, dtype=np.float64)
    return norm


def tissue_fraction(pixels: np.ndarray, intensity: float = 240, beta: float = 0.15) -> float:
    """Share of pixels whose optical density is at least ``beta`` in every channel (the pixels
    Macenko's estimate uses; the others are background)."""
    pixels = np.asarray(pixels).reshape(-1, 3)
    if not len(pixels):
        return 0.0
    # -log((I + 1) / Io) >= beta  <=>  I <= Io * exp(-beta) - 1: an integer comparison
    # instead of a float log of every pixel.
    return float((pixels <= intensity * np.exp(-beta) - 1).all(axis=1).mean())


def macenko_reference(image: np.ndarray, intensity: float = 240, alpha: float = 1,
                      beta: float = 0.15, min_tissue: float = 0.05, name: str = "reference"):
    """Stain vectors (3 x 2, haematoxylin then eosin) and 99th-percentile concentrations of
    ``image`` (uint8 ``H x W x 3``), to use as the normalisation target."""
    image = _uint8_rgb(image, name)
    frac = tissue_fraction(image, intensity, beta)
    if frac < max(min_tissue, 1e-3):
        raise KitError(f"{name}: only {frac:.1%} of its pixels are tissue; a stain reference "
                       "needs a well-stained tissue image")
    norm = _normalizer()
    try:
        with np.errstate(divide="raise", invalid="raise", over="ignore", under="ignore"):
            norm.fit(image, Io=intensity, alpha=alpha, beta=beta)
    except (np.linalg.LinAlgError, FloatingPointError, ValueError) as exc:
        raise KitError(f"{name}: cannot estimate its stains ({type(exc).__name__}); choose "
                       "another reference image") from None
    return norm.HERef, norm.maxCRef


def macenko_normalize(patches: np.ndarray, he=STANDARD_HE, max_c=STANDARD_MAX_C,
                      intensity: float = 240, alpha: float = 1, beta: float = 0.15,
                      min_tissue: float = 0.05) -> tuple[np.ndarray, bool]:
    """Macenko-normalise ``patches`` with one stain estimate over all of them.

    Parameters
    ----------
    patches : uint8 array ``... x 3``
        One image's patches (``K x P x P x 3``) or any RGB array.
    he, max_c : array-likes
        Reference stain vectors (3 x 2) and maximal concentrations (2,); default Macenko's.
    intensity, alpha, beta : float
        Background light level Io, angle percentile and background OD threshold.
    min_tissue : float
        Least share of tissue pixels for a reliable estimate.

    Returns
    -------
    (array, bool)
        The normalised uint8 array of the same shape and True; or the input unchanged and
        False when it has too little tissue or the estimate fails (degenerate colours).
    """
    arr = _uint8_rgb(patches, "patches")
    pixels = arr.reshape(-1, 1, 3)  # torchstain takes an H x W x 3 image
    frac = tissue_fraction(pixels, intensity, beta)
    # A covariance and percentiles over a handful of pixels are noise, whatever the fraction.
    if frac < min_tissue or frac * len(pixels) < MIN_TISSUE_PIXELS:
        return arr, False
    norm = _normalizer(he, max_c)
    try:
        # Degenerate inputs end in 0/0 or NaN; they must not become silently black pixels.
        with np.errstate(divide="raise", invalid="raise", over="ignore", under="ignore"):
            out, _, _ = norm.normalize(pixels, Io=intensity, alpha=alpha, beta=beta,
                                       stains=False)
    except (np.linalg.LinAlgError, FloatingPointError, ValueError):
        return arr, False
    return out.reshape(arr.shape), True


def apply_payload(patches: np.ndarray, payload: dict) -> tuple[np.ndarray, bool]:
    """:func:`macenko_normalize` with the settings of :func:`stain_payload`."""
    return macenko_normalize(patches, payload["he"], payload["max_c"], payload["intensity"],
                             payload["alpha"], payload["beta"], payload["min_tissue"])


def _uint8_rgb(arr, name: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim < 2 or arr.shape[-1] != 3:
        raise KitError(f"{name}: stain normalisation needs uint8 RGB pixels (... x 3), got "
                       f"shape {arr.shape}, dtype {arr.dtype}")
    return arr
