"""Macenko stain normalisation (kit.data.stain): two stainings of the same tissue end up alike,
a reference image sets the target, degenerate inputs are left alone, bad settings name their key."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from kit.config import load_config
from kit.data.stain import (
    STANDARD_HE,
    STANDARD_MAX_C,
    _normalizer,
    check_stain_config,
    macenko_normalize,
    macenko_reference,
    stain_key,
    stain_payload,
    tissue_fraction,
)
from kit.utils import KitError

# Stain matrices (rows: haematoxylin, eosin; columns: R, G, B optical density per unit),
# three of albumentations' HEStain presets: the colours of three different labs.
STANDARD = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
DARK = np.array([[0.78, 0.55, 0.28], [0.09, 0.97, 0.21]])
LIGHT = np.array([[0.57, 0.71, 0.38], [0.15, 0.89, 0.42]])
SETTINGS = {"method": "macenko", "reference": "", "intensity": 240, "alpha": 1, "beta": 0.15,
            "min_tissue": 0.05}


def tissue(k=4, size=64, seed=0):
    """Stain concentrations ``k x size x size x 2`` of one synthetic image: haematoxylin
    everywhere at a low level plus dense nuclei, eosin everywhere, a band of background."""
    rng = np.random.default_rng(seed)
    conc = np.zeros((k, size, size, 2))
    conc[..., 0] = rng.gamma(1.5, 0.15, (k, size, size))
    conc[..., 1] = rng.gamma(2.0, 0.4, (k, size, size))
    nuclei = rng.random((k, size, size)) < 0.25
    conc[..., 0][nuclei] += rng.uniform(0.6, 1.6, nuclei.sum())
    conc[:, : size // 8] = 0
    return conc


def render(conc, stains, uptake=(1.0, 1.0)):
    """RGB uint8 of concentrations through a stain matrix (Beer-Lambert, white light 255)."""
    od = (conc * np.asarray(uptake)) @ stains
    return np.clip(255 * np.exp(-od), 0, 255).round().astype(np.uint8)


def dist(a, b):
    return float(np.abs(a.astype(np.int64) - b).mean())


def test_two_stainings_of_the_same_tissue_end_up_close():
    conc = tissue()
    versions = [render(conc, STANDARD), render(conc, DARK, (1.3, 0.8)),
                render(conc, LIGHT, (0.8, 1.2))]
    normed = []
    for v in versions:
        out, ok = macenko_normalize(v)
        assert ok and out.shape == v.shape and out.dtype == np.uint8
        normed.append(out)
    for i in range(3):
        for j in range(i + 1, 3):
            before, after = dist(versions[i], versions[j]), dist(normed[i], normed[j])
            assert before > 10 and after < before / 3, (i, j, before, after)
    # the background band stays light
    assert all((n[:, :8] >= 235).all() for n in normed)


def test_a_reference_image_sets_the_target_colours():
    target = render(tissue(seed=1), STANDARD)  # how "our" lab stains
    he, max_c = macenko_reference(target)
    assert he.shape == (3, 2) and max_c.shape == (2,)
    # the estimated vectors point like the true ones (unit-norm columns, H then E)
    truth = STANDARD.T / np.linalg.norm(STANDARD, axis=1)
    cos = (he * truth).sum(0) / np.linalg.norm(he, axis=0)
    assert (cos > 0.97).all()
    conc = tissue(seed=2)
    foreign = render(conc, DARK, (1.3, 0.8))
    ours = render(conc, STANDARD)
    out, ok = macenko_normalize(foreign, he, max_c)
    assert ok and dist(out, ours) < dist(foreign, ours) / 3


def test_the_fast_solve_gives_torchstains_own_output():
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    img = render(tissue(seed=3), DARK, (1.2, 0.9)).reshape(-1, 1, 3)
    ref = NumpyMacenkoNormalizer()  # np.linalg.lstsq over every pixel
    expected = ref.normalize(img, Io=240, alpha=1, beta=0.15, stains=False)[0]
    got = _normalizer(STANDARD_HE, STANDARD_MAX_C).normalize(img, Io=240, alpha=1, beta=0.15,
                                                             stains=False)[0]
    assert np.array_equal(got, expected)


def test_too_little_tissue_or_flat_colour_is_left_alone():
    background = np.full((2, 32, 32, 3), 238, np.uint8)
    out, ok = macenko_normalize(background)
    assert not ok and np.array_equal(out, background)
    sparse = background.copy()
    sparse[0, :2, :2] = (120, 60, 140)  # 8 tissue pixels out of 2048
    assert macenko_normalize(sparse, min_tissue=0.0)[1] is False  # fewer than 64 pixels
    flat = np.full((1, 32, 32, 3), (150, 80, 160), np.uint8)  # one colour: no stain plane
    out, ok = macenko_normalize(flat)
    assert out.shape == flat.shape and out.dtype == np.uint8
    assert ok or np.array_equal(out, flat)
    with pytest.raises(KitError, match="uint8 RGB"):
        macenko_normalize(flat.astype(np.float32))


def test_tissue_fraction_counts_pixels_dark_in_every_channel():
    px = np.array([[250, 250, 250], [100, 100, 100], [100, 230, 100], [0, 0, 0]], np.uint8)
    assert tissue_fraction(px) == 0.5  # 230 -> OD 0.04 < 0.15 in green
    assert tissue_fraction(px, beta=0.01) == 0.75
    assert tissue_fraction(np.zeros((0, 3), np.uint8)) == 0.0


@pytest.mark.parametrize("bad,key", [
    ({"method": "reinhard"}, "stain_norm.method"), ({"alpha": 60}, "stain_norm.alpha"),
    ({"beta": 0}, "stain_norm.beta"), ({"intensity": 300}, "stain_norm.intensity"),
    ({"min_tissue": 1.5}, "stain_norm.min_tissue"), ({"reference": None}, "stain_norm.reference"),
])
def test_bad_settings_name_their_key(bad, key):
    with pytest.raises(KitError, match=rf"^patches: {key} = .* is not allowed"):
        load_config("patches", {"stain_norm": {**SETTINGS, **bad}})


def test_reference_file_enters_the_key_by_content(tmp_path):
    assert stain_key({**SETTINGS, "method": "none"}) is None
    assert stain_key(SETTINGS)["reference"] == "macenko-standard"
    with pytest.raises(KitError, match="stain_norm.reference .* not found"):
        check_stain_config({**SETTINGS, "reference": str(tmp_path / "nope.png")})
    ref = tmp_path / "a" / "ref.png"
    ref.parent.mkdir()
    Image.fromarray(render(tissue(k=1, size=96, seed=4), STANDARD)[0]).save(ref)
    moved = tmp_path / "b.png"
    shutil.copy(ref, moved)
    k1 = stain_key({**SETTINGS, "reference": str(ref)})
    assert k1 == stain_key({**SETTINGS, "reference": str(moved)})  # same content, same key
    assert k1 != stain_key(SETTINGS) and k1 != stain_key({**SETTINGS, "reference": str(ref),
                                                          "alpha": 2})
    payload = stain_payload({**SETTINGS, "reference": str(ref)})
    assert np.asarray(payload["he"]).shape == (3, 2) and len(payload["max_c"]) == 2
    Image.fromarray(np.full((40, 40, 3), 240, np.uint8)).save(moved)  # a blank "reference"
    with pytest.raises(KitError, match="tissue"):
        stain_payload({**SETTINGS, "reference": str(moved)})
