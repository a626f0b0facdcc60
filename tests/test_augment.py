"""Patch augmentation, batch normalisation, CutMix label mixing and class-imbalance helpers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kit.config import load_config
from kit.models.normalize import normalize_batch
from kit.training.augment import (
    CutMix,
    balanced_sampler,
    build_train_transform,
    class_weights,
    create_mixer,
    seed_transform,
)
from kit.utils import KitError, seed_everything

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _patch(size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _dihedral(img):
    views = []
    for k in range(4):
        views += [np.rot90(img, k), np.rot90(np.fliplr(img), k)]
    return views


# --------------------------------------------------------------------------- pipeline
def test_defaults_match_the_config_file():
    cfg = load_config("augment")
    assert cfg["cutmix_alpha"] == 1.0
    assert set(cfg["color_jitter"]) == {"p", "brightness", "contrast", "saturation", "hue"}
    assert set(cfg["he_stain"]) == {"p", "method", "preset", "scale", "shift",
                                    "augment_background"}
    assert cfg["he_stain"]["p"] == 0.0  # off until it measures better (issue 9)
    names = [type(t).__name__ for t in build_train_transform(load_config("augment"),
                                                             seed=0).transforms]
    assert "HEStain" not in names and names[-1] == "ColorJitter"


def test_transform_keeps_shape_and_dtype():
    t = build_train_transform(load_config("augment"), seed=0)
    img = _patch(40)
    for _ in range(10):
        out = t(image=img)["image"]
        assert out.shape == img.shape and out.dtype == np.uint8


def test_geometry_only_gives_a_dihedral_view_of_the_patch():
    t = build_train_transform(load_config("augment", {"color_jitter": {"p": 0.0}}), seed=1)
    img = _patch()
    seen = set()
    for _ in range(60):
        out = t(image=img)["image"]
        matches = [i for i, v in enumerate(_dihedral(img)) if np.array_equal(out, v)]
        assert matches, "output is not a flip/rotation of the input"
        seen.add(matches[0])
    assert len(seen) == 8  # flips + rot90 reach every symmetry of the square


def test_each_transform_follows_its_probability():
    img = _patch()
    only_hflip = {"hflip": 1.0, "vflip": 0.0, "rot90": 0.0, "color_jitter": {"p": 0.0}}
    flip = build_train_transform(load_config("augment", only_hflip))
    assert np.array_equal(flip(image=img)["image"], img[:, ::-1])
    nothing = {"hflip": 0.0, "vflip": 0.0, "rot90": 0.0, "color_jitter": {"p": 0.0}}
    assert np.array_equal(build_train_transform(load_config("augment",
                                                            nothing))(image=img)["image"], img)
    jitter_only = {"hflip": 0.0, "vflip": 0.0, "rot90": 0.0,
                   "color_jitter": {"p": 1.0, "brightness": 0.5, "hue": 0.1}}
    out = build_train_transform(load_config("augment", jitter_only), seed=0)(image=img)["image"]
    assert out.shape == img.shape and not np.array_equal(out, img)


def test_transform_is_reproducible_with_a_seed():
    img = _patch()
    t1, t2, t3 = (build_train_transform(load_config("augment"), seed=s) for s in (7, 7, 8))
    a, b, c = ([t(image=img)["image"] for _ in range(5)] for t in (t1, t2, t3))
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))
    seed_transform(t3, 7)  # what a data-loader worker_init_fn does
    assert all(np.array_equal(t3(image=img)["image"], u) for u in a)


@pytest.mark.parametrize("bad", [
    {"hflip": 1.5}, {"rot90": -0.1}, {"color_jitter": {"hue": 0.7}},
    {"color_jitter": {"brightness": 1.2}}, {"color_jitter": {"p": "often"}}, {"cutmix_alpha": -1},
])
def test_bad_augment_config(bad):
    key = next(iter(bad)) + ("." + next(iter(bad["color_jitter"])) if "color_jitter" in bad else "")
    with pytest.raises(KitError, match=rf"^augment: {key} = .* is not allowed"):
        load_config("augment", bad)


@pytest.mark.parametrize("bad,key", [
    ({"p": 1.5}, "he_stain.p"), ({"method": "reinhard"}, "he_stain.method"),
    ({"method": "preset", "preset": "pink"}, "he_stain.preset"), ({"scale": 0.8}, "he_stain.scale"),
    ({"shift": -0.1}, "he_stain.shift"),
    ({"augment_background": "yes"}, "he_stain.augment_background"),
])
def test_bad_he_stain_config_names_the_key(bad, key):
    with pytest.raises(KitError, match=rf"^augment: {key} = .* is not allowed"):
        load_config("augment", {"he_stain": {"p": 0.5, **bad}})


# --------------------------------------------------------------------------- H&E stain jitter
STANDARD_HE = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])  # rows: H, E optical densities


def _he_patch(size=48, seed=0):
    """A synthetic H&E patch: nuclei (haematoxylin), stroma (eosin), white background."""
    rng = np.random.default_rng(seed)
    conc = np.zeros((size, size, 2))
    conc[..., 1] = rng.gamma(2.0, 0.3, (size, size))  # eosin everywhere
    yy, xx = np.mgrid[:size, :size]
    for cy, cx in rng.integers(0, size, (6, 2)):  # round nuclei
        conc[(yy - cy) ** 2 + (xx - cx) ** 2 < 25, 0] = rng.uniform(0.8, 1.6)
    conc[: size // 6] = 0  # a band of background
    od = conc @ STANDARD_HE
    return np.clip(255 * np.exp(-od), 0, 255).round().astype(np.uint8)


def _stain_only(**stain):
    return {"hflip": 0.0, "vflip": 0.0, "rot90": 0.0, "color_jitter": {"p": 0.0},
            "he_stain": {"p": 1.0, **stain}}


@pytest.mark.parametrize("method", ["random_preset", "preset", "macenko"])
def test_he_stain_changes_colours_not_geometry(method):
    img = _he_patch()
    out = build_train_transform(load_config("augment", _stain_only(method=method)),
                                seed=3)(image=img)["image"]
    assert out.shape == img.shape and out.dtype == np.uint8
    tissue = img.astype(int).sum(-1) < 3 * 250
    assert (out != img).any(-1)[tissue].mean() > 0.5  # colours moved
    # a per-pixel colour map: the same draw on a flipped patch gives the flipped result
    flipped = build_train_transform(load_config("augment", _stain_only(method=method)),
                                    seed=3)(image=img[:, ::-1])
    assert np.array_equal(flipped["image"], out[:, ::-1])
    # equal input pixels stay equal, and the white background stays white
    background = img[: img.shape[0] // 6]
    assert (background >= 250).all() and (out[: img.shape[0] // 6] >= 250).all()
    colours, inverse = np.unique(img.reshape(-1, 3), axis=0, return_inverse=True)
    per_colour = out.reshape(-1, 3)
    for c in range(0, len(colours), max(1, len(colours) // 50)):
        assert (per_colour[inverse.ravel() == c] == per_colour[inverse.ravel() == c][0]).all()


def test_he_stain_scales_the_stains_within_the_configured_range():
    img = _he_patch(seed=1)
    tissue = img.reshape(-1, 3)[(img.reshape(-1, 3).astype(int).sum(1) < 3 * 230)]
    od_in = -np.log(np.maximum(tissue / 255.0, 1e-6)).sum(1).mean()
    ratios = []
    for seed in range(30):
        cfg = _stain_only(method="preset", preset="standard", scale=0.2, shift=0.0)
        out = build_train_transform(load_config("augment", cfg), seed=seed)(image=img)["image"]
        t_out = out.reshape(-1, 3)[(img.reshape(-1, 3).astype(int).sum(1) < 3 * 230)]
        ratios.append(-np.log(np.maximum(t_out / 255.0, 1e-6)).sum(1).mean() / od_in)
    # the image's own stain matrix, no shift: total optical density scales by 0.8..1.2
    assert 0.78 < min(ratios) < 0.95 and 1.05 < max(ratios) < 1.22


def test_he_stain_is_reproducible_with_the_seed():
    img = _he_patch(seed=2)
    t1, t2, t3 = (build_train_transform(load_config("augment", _stain_only()), seed=s)
                  for s in (5, 5, 6))
    a, b, c = ([t(image=img)["image"] for _ in range(4)] for t in (t1, t2, t3))
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))
    assert not all(np.array_equal(a[0], u) for u in a[1:])  # a new draw per call


def test_unknown_augment_key_is_refused():
    with pytest.raises(KitError, match="unknown key"):
        build_train_transform(load_config("augment", {"hflp": 0.5}))


# --------------------------------------------------------------------------- normalisation
def test_normalize_batch_values_and_layouts():
    x = torch.from_numpy(np.stack([_patch(16, s) for s in range(3)]))  # B x H x W x 3 uint8
    out = normalize_batch(x, MEAN, STD, size=16)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    expected = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-6)
    chw = normalize_batch(x.permute(0, 3, 1, 2).contiguous(), MEAN, STD)
    assert torch.allclose(chw, expected, atol=1e-6)
    floats = normalize_batch(x.float() / 255, MEAN, STD)
    assert torch.allclose(floats, expected, atol=1e-6)
    assert x.dtype == torch.uint8  # the input is left alone


def test_normalize_batch_resizes():
    x = torch.full((2, 24, 24, 3), 128, dtype=torch.uint8)
    for size in (16, 40):
        out = normalize_batch(x, MEAN, STD, size=size)
        assert out.shape == (2, 3, size, size)
        const = (128 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
        assert torch.allclose(out, const.view(1, 3, 1, 1).expand_as(out), atol=1e-5)


@pytest.mark.parametrize("size", [20, 48])
def test_normalize_batch_uint8_and_float_resizes_agree(size):
    x = torch.from_numpy(np.stack([_patch(32, s) for s in range(2)]))
    fast = normalize_batch(x, MEAN, STD, size=size)  # uint8 kernel on the CPU
    ref = normalize_batch(x.float() / 255, MEAN, STD, size=size)  # float kernel
    assert fast.shape == ref.shape == (2, 3, size, size)
    # the uint8 kernel rounds to whole grey levels: at most ~1 level apart
    assert (fast - ref).abs().max() <= 1.01 / 255 / min(STD)


def test_normalize_batch_memory_format():
    x = torch.from_numpy(np.stack([_patch(8)] * 2))
    assert normalize_batch(x, MEAN, STD).is_contiguous(memory_format=torch.channels_last)
    assert normalize_batch(x, MEAN, STD, channels_last=False).is_contiguous()
    chw = x.permute(0, 3, 1, 2).contiguous()
    assert normalize_batch(chw, MEAN, STD, channels_last=True).is_contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(2, 8, 8), (2, 8, 8, 4), (2, 1, 8, 8)])
def test_normalize_batch_bad_shapes(shape):
    with pytest.raises(KitError, match=r"normalize_batch expects (a 4-d batch|3 channels)"):
        normalize_batch(torch.zeros(shape, dtype=torch.uint8), MEAN, STD)


# --------------------------------------------------------------------------- CutMix
def test_alpha_zero_turns_cutmix_off():
    assert create_mixer(0, 4) is None
    assert create_mixer(0.0, 4) is None
    mixer = create_mixer(1.0, 4)
    from timm.data import Mixup

    assert isinstance(mixer, CutMix) and isinstance(mixer, Mixup)
    assert mixer.cutmix_alpha == 1.0 and mixer.mixup_alpha == 0.0 and mixer.mix_prob == 1.0
    from kit.config import train_settings

    # Out-of-range values are the schema's to refuse, when the settings are loaded.
    with pytest.raises(KitError, match=r"train: augment.cutmix_alpha = -1"):
        train_settings({"augment": {"cutmix_alpha": -1}})
    with pytest.raises(KitError, match=r"train: label_smoothing = 1.0"):
        train_settings({"label_smoothing": 1.0})


def _onehot(i, k=4):
    return torch.eye(k)[i]


def test_cutmix_labels_follow_the_pasted_area():
    seed_everything(0)
    mixer = create_mixer(1.0, 4)
    partial = 0
    for _ in range(40):
        x = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])
        y = torch.tensor([0, 2])
        xm, target = mixer(x, y)
        pasted0 = xm[0].mean().item()  # ones pasted into the zeros sample
        pasted1 = 1 - xm[1].mean().item()  # zeros pasted into the ones sample
        lam = 1 - pasted0
        assert torch.allclose(target[0], lam * _onehot(0) + (1 - lam) * _onehot(2), atol=1e-6)
        assert torch.allclose(target[1], (1 - pasted1) * _onehot(2) + pasted1 * _onehot(0),
                              atol=1e-6)
        # the pasted region is one rectangle through all channels
        mask = xm[0, 0] > 0.5
        assert torch.equal(xm[0], mask.float().expand(3, -1, -1))
        if mask.any():
            rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
            assert mask.sum() == len(rows) * len(cols)
        partial += 0 < pasted0 < 1
    assert partial >= 30  # the box is usually neither empty nor the whole patch


def test_cutmix_pairs_sample_i_with_its_mirror():
    seed_everything(1)
    mixer = create_mixer(1.0, 4)
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 16, 16).clone()
    y = torch.tensor([0, 1, 2, 3])
    xm, target = mixer(x, y)
    for i in range(4):
        values = set(xm[i].unique().tolist())
        assert values <= {float(i), float(3 - i)}
        pasted = (xm[i] == 3 - i).float().mean().item()
        expected = (1 - pasted) * _onehot(i) + pasted * _onehot(3 - i)
        assert torch.allclose(target[i], expected, atol=1e-6)


def test_cutmix_odd_batch_leaves_the_last_sample_whole():
    seed_everything(2)
    mixer = create_mixer(1.0, 4)
    x = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16), torch.full((3, 16, 16), 0.5)])
    xm, target = mixer(x, torch.tensor([1, 3, 0]))
    assert target.shape == (3, 4)
    assert torch.equal(xm[2], torch.full((3, 16, 16), 0.5)) and torch.equal(target[2], _onehot(0))
    pasted = xm[0].mean().item()
    assert torch.allclose(target[0], (1 - pasted) * _onehot(1) + pasted * _onehot(3), atol=1e-6)
    one, t1 = mixer(torch.ones(1, 3, 8, 8), torch.tensor([2]))
    assert torch.equal(one, torch.ones(1, 3, 8, 8)) and torch.equal(t1, _onehot(2)[None])


def test_cutmix_label_smoothing_keeps_probabilities():
    seed_everything(3)
    mixer = create_mixer(1.0, 4, label_smoothing=0.1)
    _, target = mixer(torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0]))
    assert torch.allclose(target.sum(1), torch.ones(5))
    assert target.min() >= 0.1 / 4 - 1e-6


def test_cutmix_is_reproducible_after_seeding():
    outs = []
    for _ in range(2):
        seed_everything(5)
        mixer = create_mixer(1.0, 4)
        outs.append(mixer(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                          torch.tensor([0, 1, 2, 3])))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# --------------------------------------------------------------------------- imbalance
def test_class_weights_inverse_frequency_normalised():
    labels = [0, 0, 0, 1, 1, 2] * 5
    w = class_weights(labels, 4)
    assert w.dtype == torch.float32 and w.shape == (4,)
    counts = torch.tensor([15.0, 10.0, 5.0])
    assert torch.allclose(w[:3] * counts, torch.full((3,), 10.0))  # each class weighs the same
    assert w[3] == 0  # absent class
    assert torch.isclose(w[torch.tensor(labels)].mean(), torch.tensor(1.0))  # mean sample weight 1
    assert torch.allclose(class_weights([0, 1, 2, 3], 4), torch.ones(4))
    assert torch.allclose(class_weights(torch.tensor([1, 1, 0]), 2), torch.tensor([1.5, 0.75]))


@pytest.mark.parametrize("labels", [[], [0, 4], [-1, 0], [0.5, 1.0], [[0, 1]]])
def test_class_weights_bad_labels(labels):
    with pytest.raises(KitError, match=r"labels must (be a non-empty 1-d array|lie in 0..3)"):
        class_weights(labels, 4)


def test_balanced_sampler_roughly_balances():
    labels = np.array([0] * 800 + [1] * 150 + [2] * 50)
    sampler = balanced_sampler(labels, seed=0)
    assert len(sampler) == len(labels)
    drawn = labels[list(sampler)]
    freq = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.all(np.abs(freq - 1 / 3) < 0.06), freq
    again = list(balanced_sampler(labels, seed=0))
    assert again == list(balanced_sampler(labels, seed=0))
    assert again != list(balanced_sampler(labels, seed=1))


def test_balanced_sampler_with_weights_keeps_classes_equal_and_weights_within_them():
    y = np.array([0] * 50 + [1] * 50)
    w = np.where(y == 0, 1.0, 0.2)
    w[:10] = 5.0  # within class 0, these ten images count more
    draws = np.concatenate([np.fromiter(balanced_sampler(y, seed, w), int) for seed in range(40)])
    share = np.bincount(y[draws], minlength=2) / len(draws)
    assert abs(share[0] - 0.5) < 0.02
    first_ten = np.isin(draws, np.arange(10)).mean() / share[0]
    assert abs(first_ten - 50 / 90) < 0.03  # 10 x 5 of class 0's total weight 90
