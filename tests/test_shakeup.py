"""kit.submission.shakeup: the public/private spread from OOF rows against the spread of the
held-back test labels themselves, the private estimate, the paired P(A beats B), the
manifest's shake-up record and the nested OOF file kept beside each submission."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kit.metrics import bootstrap_ci, fast_macro_f1
from kit.submission.shakeup import (
    DEFAULT_PUBLIC_FRACTION,
    nested_oof_path,
    p_beats,
    private_estimate,
    public_fraction_of,
    public_private_spread,
    read_nested_oof,
    shakeup_record,
    split_spread,
    write_nested_oof,
)
from kit.utils import KitError


def _classifier(n, accuracy, seed, weights=(0.35, 0.3, 0.25, 0.1)):
    rng = np.random.default_rng(seed)
    y = rng.choice(4, size=n, p=weights)
    wrong = rng.random(n) > accuracy
    pred = np.where(wrong, rng.integers(0, 4, size=n), y)
    return y, pred


def _f1(y, p):
    return fast_macro_f1(y, p, 4)


@pytest.mark.parametrize("accuracy", [0.45, 0.8])
def test_oof_spread_matches_the_held_back_test_labels(accuracy):
    # The v2 shape: 581 OOF rows, 477 test images; the public part is 30 % of them.
    y_oof, p_oof = _classifier(581, accuracy, seed=1)
    y_test, p_test = _classifier(477, accuracy, seed=2)
    est = public_private_spread(y_oof, p_oof, _f1, n_test=477, public_fraction=0.3, n_draws=800)
    seen = split_spread(y_test, p_test, _f1, public_fraction=0.3, n_draws=800)
    assert 0.7 * seen <= est["sd_public_minus_private"] <= 1.3 * seen
    assert est["sd_public"] > est["sd_private"]  # the public part is the smaller sample


def test_spread_is_deterministic_and_shrinks_with_more_test_images():
    y, p = _classifier(600, 0.6, seed=3)
    a = public_private_spread(y, p, _f1, 477, 0.3, n_draws=300, seed=5)
    assert a == public_private_spread(y, p, _f1, 477, 0.3, n_draws=300, seed=5)
    small = public_private_spread(y, p, _f1, 120, 0.3, n_draws=300, seed=5)
    assert small["sd_public_minus_private"] > a["sd_public_minus_private"]


def test_private_estimate_weights_each_score_by_its_precision():
    spread = {"sd_public": 0.04, "sd_private": 0.025}
    sure = private_estimate(0.50, 0.005, public=0.60, spread=spread)
    assert 0.50 < sure["estimate"] < 0.52 and sure["weight_public"] < 0.1
    loose = private_estimate(0.50, 0.2, public=0.60, spread=spread)
    assert loose["estimate"] > 0.59
    lo, hi = sure["ci"]
    assert lo < sure["estimate"] < hi and hi - lo > 2 * 1.9 * 0.025


def test_p_beats_is_paired_and_symmetric():
    y, better = _classifier(581, 0.7, seed=4)
    worse = better.copy()
    flip = np.random.default_rng(0).random(len(y)) < 0.15
    worse[flip] = (worse[flip] + 1) % 4
    p = p_beats(y, better, worse, _f1, 477, 0.3, n_draws=300)
    assert p > 0.95
    assert p_beats(y, worse, better, _f1, 477, 0.3, n_draws=300) == pytest.approx(1 - p)
    assert p_beats(y, better, better, _f1, 477, 0.3, n_draws=50) == 0.5


def test_bad_fraction_is_refused():
    y, p = _classifier(50, 0.6, seed=0)
    with pytest.raises(ValueError, match="public_fraction must be in"):
        public_private_spread(y, p, _f1, 40, 1.0)
    with pytest.raises(ValueError, match="leave a part empty"):
        public_private_spread(y, p, _f1, 2, 0.1)


def test_each_part_spreads_as_a_fresh_sample_of_its_size():
    # Independent draws of a public-sized and a private-sized set from the same classifier:
    # the spread the OOF rows must show. Drawing the test sets without replacement from 581
    # rows gave about 0.65 of the private spread.
    y, p = _classifier(581, 0.45, seed=1)
    est = public_private_spread(y, p, _f1, n_test=477, public_fraction=0.3, n_draws=800)
    fresh_pub = np.std([_f1(*_classifier(143, 0.45, seed=100 + i)) for i in range(400)])
    fresh_priv = np.std([_f1(*_classifier(334, 0.45, seed=1000 + i)) for i in range(400)])
    assert 0.8 * fresh_pub <= est["sd_public"] <= 1.25 * fresh_pub
    assert 0.8 * fresh_priv <= est["sd_private"] <= 1.25 * fresh_priv


def test_private_estimate_without_a_public_score_is_the_nested_one():
    spread = {"sd_public": 0.04, "sd_private": 0.03}
    est = private_estimate(0.5, 0.02, public=None, spread=spread)
    assert est["estimate"] == 0.5 and est["weight_public"] == 0.0
    half = 1.959964 * (0.02 ** 2 + 0.03 ** 2) ** 0.5
    assert est["ci"] == pytest.approx([0.5 - half, 0.5 + half], abs=1e-5)


# ----------------------------------------------------------------------------- the record

CLASSES4 = ("Luminal A", "Luminal B", "HER2(+)", "Triple negative")


def test_shakeup_record_for_the_manifest():
    y, p = _classifier(400, 0.6, seed=7)
    rec = shakeup_record(y, p, "macro_f1", CLASSES4, n_test=300, n_draws=300)
    assert rec["public_fraction"] == DEFAULT_PUBLIC_FRACTION == 0.3
    assert rec["public_fraction_source"] == "assumed" and rec["metric"] == "macro_f1"
    assert rec["n_test"] == 300 and rec["n_rows"] == 400 and rec["n_draws"] == 300
    assert set(rec) >= {"sd_public_minus_private", "sd_public", "sd_private", "expected_se"}
    # label strings and class indices are the same rows
    labels = [CLASSES4[i] for i in y], [CLASSES4[i] for i in p]
    assert shakeup_record(*labels, "macro_f1", CLASSES4, 300, n_draws=300) == rec
    # the standard error is the one the nested score's bootstrap interval shows
    lo, hi = bootstrap_ci(y, p, metric="macro_f1")
    assert rec["expected_se"] == pytest.approx((hi - lo) / 3.92, rel=0.15)
    given = shakeup_record(y, p, "macro_f1", CLASSES4, 300, public_fraction=0.5, n_draws=300)
    assert given["public_fraction"] == 0.5 and given["public_fraction_source"] == "task"
    # a larger public part is a more precise public score
    assert given["sd_public"] < rec["sd_public"]
    other = shakeup_record(y, p, "accuracy", CLASSES4, 300, n_draws=300)
    assert other["metric"] == "accuracy" and other["sd_public"] != rec["sd_public"]


def test_public_fraction_comes_from_the_task_when_it_has_one():
    from kit.task import default_task

    assert public_fraction_of(default_task()) == (DEFAULT_PUBLIC_FRACTION, "assumed")
    assert public_fraction_of(SimpleNamespace(public_fraction=0.2)) == (0.2, "task")


def test_nested_oof_file_round_trip_and_bad_files(tmp_path):
    csv = tmp_path / "submissions" / "20250101-000000_blend.csv"
    path = nested_oof_path(csv)
    assert path.name == "20250101-000000_blend.oof.csv"
    ids = ["img_0002.png", "img_0000.png", "img_0001.png"]
    write_nested_oof(path, ids, ["Luminal A", "HER2(+)", "Luminal B"],
                     ["Luminal B", "HER2(+)", "Luminal B"])
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert path.read_text().splitlines()[0] == "sample_index,label,pred"
    rows = read_nested_oof(path, CLASSES4)
    assert list(rows.index) == ids
    assert rows.y.tolist() == [0, 2, 1] and rows.pred.tolist() == [1, 2, 1]
    with pytest.raises(ValueError, match="3 ids, 2 labels"):
        write_nested_oof(path, ids, ["Luminal A"] * 2, ["Luminal A"] * 3)
    path.write_text("sample_index,label,pred\nimg_0000.png,Luminal C,Luminal A\n")
    with pytest.raises(KitError, match=r"oof\.csv: unknown label 'Luminal C'.*rerun ./run.sh "
                                       r"blend"):
        read_nested_oof(path, CLASSES4)
    path.write_text("sample_index,label,pred\na,Luminal A,Luminal A\na,Luminal A,Luminal B\n")
    with pytest.raises(KitError, match="sample_index a appears twice"):
        read_nested_oof(path, CLASSES4)
    path.write_text("sample_index,label\na,Luminal A\n")
    with pytest.raises(KitError, match="missing column.*pred"):
        read_nested_oof(path, CLASSES4)
    path.unlink()
    with pytest.raises(KitError, match="nested OOF file not found"):
        read_nested_oof(path, CLASSES4)
