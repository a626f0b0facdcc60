"""``./run.sh choose``: the two submissions to select, on manifests and nested OOF files made
here from small numpy draws (no training)."""
from __future__ import annotations

import numpy as np
import pytest

from fake_kaggle import write_fake_submission
from kit import CLASSES
from kit.cli import main
from kit.metrics import bootstrap_ci, fast_macro_f1
from kit.paths import Paths
from kit.submission import package
from kit.submission.choose import NOISE, choose
from kit.submission.shakeup import shakeup_record
from kit.utils import KitError

N_OOF, N_TEST = 500, 300
RNG_Y = np.random.default_rng(0)
Y = RNG_Y.choice(4, size=N_OOF, p=(0.35, 0.3, 0.25, 0.1))


def _pred(accuracy: float, seed: int, base=None, flips: int = 0) -> np.ndarray:
    """Right with probability ``accuracy``, else a random class; or ``base`` with ``flips``
    rows changed (a near twin of it)."""
    rng = np.random.default_rng(seed)
    if base is not None:
        pred = base.copy()
        rows = rng.choice(N_OOF, size=flips, replace=False)
        pred[rows] = (pred[rows] + 1) % 4
        return pred
    return np.where(rng.random(N_OOF) < accuracy, Y, rng.integers(0, 4, size=N_OOF))


def _submission(workdir, k: int, runs, pred, *, public=None, oof=True, shake=True):
    """A packaged submission whose nested predictions are ``pred``: its expected score, the
    interval and the shake-up computed from them, as the blend records them."""
    ids = [f"img_{i:04d}.png" for i in range(N_OOF)]
    expected = fast_macro_f1(Y, pred)
    csv = write_fake_submission(
        workdir, stem=f"2025010{k}-000000_s{k}", nested=expected, ci=bootstrap_ci(Y, pred),
        created_utc=f"2025-01-0{k}T00:00:00+00:00", runs=runs, latest=False,
        labels=[CLASSES[(i * (k + 1) + k) % 4] for i in range(5)],
        shakeup=shakeup_record(Y, pred, "macro_f1", CLASSES, N_TEST, n_draws=300)
        if shake else None,
        oof=(ids, [CLASSES[i] for i in Y], [CLASSES[i] for i in pred]) if oof else None)
    if public is not None:
        package.append_submission(csv.with_suffix(".json"), {
            "id": f"r{k}", "time": "2025-01-09T00:00:00+00:00", "competition": "c",
            "message": "m", "csv": csv.name, "ref": 100 + k, "status": "complete",
            "public_score": public})
    return csv


def _names(result) -> list[str]:
    return [row["file"].split("_")[1].removesuffix(".csv") for row in result["picks"]]


def test_the_obvious_best_is_first(tmp_path):
    _submission(tmp_path, 1, ["effnet"], _pred(0.4, 1))
    _submission(tmp_path, 2, ["phikon"], _pred(0.85, 2))
    _submission(tmp_path, 3, ["uni"], _pred(0.6, 3))
    result = choose(Paths.from_root(tmp_path), n_draws=400)
    assert _names(result) == ["s2", "s3"]
    assert result["p_first_beats"] > 0.99
    assert result["why"][0] == "the highest estimated private score"
    assert result["n_test"] == N_TEST and result["fraction_source"] == "assumed"


def test_a_near_tie_of_the_same_runs_is_passed_over_for_other_runs(tmp_path):
    best = _pred(0.75, 1)
    _submission(tmp_path, 1, {"phikon": "a" * 64, "uni": "b" * 64}, best)
    twin = _pred(0, 0, base=best, flips=6)  # same runs, a hair below
    _submission(tmp_path, 2, {"phikon": "a" * 64, "uni": "b" * 64}, twin)
    other = _pred(0.72, 7)  # other runs, within noise of the twin
    _submission(tmp_path, 3, {"effnet": "c" * 64}, other)
    _submission(tmp_path, 4, {"resnet": "d" * 64}, _pred(0.3, 8))
    assert fast_macro_f1(Y, twin) > fast_macro_f1(Y, other)  # the twin ranks second
    result = choose(Paths.from_root(tmp_path), n_draws=400)
    assert _names(result) == ["s1", "s3"]
    assert "other runs than the first" in result["why"][1] and "s2" in result["why"][1]
    assert result["p_first_beats"] is not None
    # the same twin against clearly worse other runs: kept, beyond noise
    (tmp_path / "submissions" / "20250103-000000_s3.json").unlink()
    _submission(tmp_path, 5, {"effnet": "c" * 64}, _pred(0.45, 9))
    result = choose(Paths.from_root(tmp_path), n_draws=400)
    assert _names(result) == ["s1", "s2"]
    assert "beyond noise" in result["why"][1] and f">= {NOISE:.2f}" in result["why"][1]


def test_a_public_score_moves_the_estimate_by_its_precision(tmp_path):
    _submission(tmp_path, 1, ["phikon"], _pred(0.66, 1))
    _submission(tmp_path, 2, ["uni"], _pred(0.66, 5))  # 0.013 above s1
    assert _names(choose(Paths.from_root(tmp_path), n_draws=100)) == ["s2", "s1"]
    path = tmp_path / "submissions" / "20250101-000000_s1.json"
    package.append_submission(path, {
        "id": "r1", "time": "2025-01-09T00:00:00+00:00", "competition": "c", "message": "m",
        "csv": "20250101-000000_s1.csv", "ref": 101, "status": "complete",
        "public_score": 0.90})
    result = choose(Paths.from_root(tmp_path), n_draws=100)
    assert _names(result) == ["s1", "s2"]  # the public score lifts s1 above s2
    first, shake = result["picks"][0], package.load_manifest(path)["shakeup"]
    se, sd_pub = shake["expected_se"], shake["sd_public"]
    w = se ** 2 / (se ** 2 + sd_pub ** 2)  # the public part's precision against the nested
    assert 0.1 < w < 0.3 and first["estimate_basis"] == "nested+public"
    assert first["estimate"] == pytest.approx(first["expected"] + w * (0.90 - first["expected"]))
    assert result["picks"][1]["estimate"] == result["picks"][1]["expected"]


def test_fewer_than_two_and_no_oof_files(tmp_path, capsys):
    with pytest.raises(KitError, match="no submission to choose from"):
        choose(Paths.from_root(tmp_path))
    _submission(tmp_path, 1, ["phikon"], _pred(0.7, 1), oof=False)
    result = choose(Paths.from_root(tmp_path))
    assert _names(result) == ["s1"] and any("only one submission" in n for n in result["notes"])
    _submission(tmp_path, 2, ["phikon"], _pred(0.6, 2), oof=False, shake=False)
    _submission(tmp_path, 3, ["uni"], _pred(0.55, 3), oof=False)
    result = choose(Paths.from_root(tmp_path))
    assert _names(result) == ["s1", "s2"] and result["p_first_beats"] is None
    notes = " ".join(result["notes"])
    assert "no nested OOF file for 20250101-000000_s1" in notes
    assert "not on Kaggle yet" in notes
    # the command prints the picks, the reasons and the notes
    assert main(["choose", "--workdir", str(tmp_path), "--n-draws", "100"]) == 0
    out = capsys.readouterr().out
    assert "1. 20250101-000000_s1.csv  est. private" in out and "why:" in out
    assert "note: could not tell" in out or "note: P(first beats second) unknown" in out
    assert main(["choose", "--workdir", str(tmp_path / "empty")]) == 2
    assert "no submission to choose from" in capsys.readouterr().err


def test_the_same_csv_counts_once_and_scoring_errors_are_left_out(tmp_path):
    pred = _pred(0.7, 1)
    _submission(tmp_path, 1, ["phikon"], pred)
    csv = _submission(tmp_path, 2, ["uni"], _pred(0.8, 2))
    package.append_submission(csv.with_suffix(".json"), {
        "id": "x", "time": "2025-01-09T00:00:00+00:00", "competition": "c", "message": "m",
        "csv": csv.name, "ref": 5, "status": "error", "error": "bad rows"})
    copy = tmp_path / "submissions" / "20250103-000000_s3"
    copy.with_suffix(".csv").write_bytes((tmp_path / "submissions" /
                                          "20250101-000000_s1.csv").read_bytes())
    manifest = package.load_manifest(tmp_path / "submissions" / "20250101-000000_s1.json")
    manifest["files"] = {"csv": copy.name + ".csv", "manifest": copy.name + ".json"}
    package.atomic_write_json(copy.with_suffix(".json"), manifest)
    _submission(tmp_path, 4, ["effnet"], _pred(0.5, 4))
    result = choose(Paths.from_root(tmp_path), n_draws=100)
    assert _names(result) == ["s1", "s4"] or _names(result) == ["s3", "s4"]
    notes = " ".join(result["notes"])
    assert "upload status is error" in notes and "the same CSV as" in notes
