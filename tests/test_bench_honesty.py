"""``bench honesty``: a tiny end-to-end run of the harness, and the held-back labels stay
held back (no kit stage opens them)."""
from __future__ import annotations

import json
import math
import os
import sys

import pandas as pd
import pytest

from kit import PROB_COLUMNS
from kit.bench import honesty
from kit.cli import main
from kit.data import synth
from kit.paths import Paths

# Opens of the held-back label file while ``_WATCH["on"]``: (path, opened by the bench's reader).
_WATCH = {"on": False, "reader": False, "opens": []}


def _audit(event, args):
    if event != "open" or not _WATCH["on"] or synth.TEST_LABELS_CSV not in str(args[0]):
        return
    path, mode, flags = args  # builtins.open gives a mode string, os.open flags
    writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
              else bool(flags & (os.O_WRONLY | os.O_RDWR)))
    if not writes:  # the generator writes it; only reading it would be a leak
        _WATCH["opens"].append((str(path), _WATCH["reader"]))


sys.addaudithook(_audit)  # cannot be removed; idle unless _WATCH["on"]

TINY_DATA = dict(n_train=24, n_test=8, short_side=64, long_side_max=128, label_noise=0.1)
TINY = honesty.Preset(
    "tiny", data=TINY_DATA, standin_data={**TINY_DATA, "n_test": 2},
    patches={"size": 32, "stride": 16, "top_k": 2}, folds={"n_splits": 2},
    train={"epochs": 2, "patience": 0, "inner_folds": 2, "batch_size": 16},
    standin={"epochs": 2}, seeds=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    reader = honesty.heldout_labels

    def watched(data):
        _WATCH["reader"] = True
        try:
            return reader(data)
        finally:
            _WATCH["reader"] = False

    mp.setattr(honesty, "heldout_labels", watched)
    _WATCH.update(on=True, opens=[])
    workdir = Paths.from_root(tmp_path_factory.mktemp("honesty"))
    try:
        result = honesty.run_honesty(workdir, TINY, seeds=[3], modes=["inner", "oof"],
                                     training_paths=["probe", "feature_cache", "pixels"])
    finally:
        _WATCH["on"] = False
        mp.undo()
    return workdir, result, list(_WATCH["opens"])


def test_every_path_and_mode_gets_finite_oof_and_test_scores(tiny_run):
    workdir, result, _ = tiny_run
    saved = json.loads((workdir.runs_dir / "bench/honesty/tiny/results.json").read_text())
    assert saved["seeds"] == [3] and saved["modes"] == ["inner", "oof"]
    runs = {(r["path"], r["mode"]): r for r in saved["runs"]}
    paths = ("probe", "feature_cache", "pixels")
    assert set(runs) == {(p, m) for p in paths for m in ("inner", "oof")}
    # probe: the cache path's default head, whatever the mode; feature_cache: the MLP it pins
    assert {runs[("probe", m)]["recorded_mode"] for m in ("inner", "oof")} == {"probe"}
    assert runs[("feature_cache", "inner")]["recorded_mode"] == "inner"
    for r in runs.values():
        assert 0 <= r["oof"] <= 1 and 0 <= r["test"] <= 1
        assert r["gap"] == pytest.approx(r["oof"] - r["test"])
        assert r["n_test"] == TINY_DATA["n_test"] and math.isfinite(r["seconds"])
    blends = {b["mode"]: b for b in saved["blends"]}
    assert set(blends) == {"inner", "oof"}
    for b in blends.values():
        assert 0 <= b["expected"] <= 1 and 0 <= b["test"] <= 1
        assert b["inputs"] == [f"{p}-{b['mode']}" for p in paths]
        # biases: auto recorded its choice, and applied them only on a positive nested gain
        assert b["biases"]["applied"] == (b["biases"]["nested_gain"] > 0)
    rows = {(r["path"], r["mode"]) for r in saved["summary"]}
    assert rows == set(runs) | {("blend", "inner"), ("blend", "oof")}
    table = honesty.format_table(result)
    assert "|OOF-test|" in table and "feature_cache" in table and "blend" in table
    assert "blend.biases auto: class biases applied in" in table
    # the oof runs are the ratio's reference: exactly 1 where their seconds are > 0
    for row in saved["summary"]:
        if row["mode"] == "oof" and row["path"] != "blend" and row["seconds"] > 0:
            assert row["seconds_ratio"] == pytest.approx(1.0)


def test_test_scores_are_computed_from_the_runs_test_files(tiny_run):
    from kit.metrics import macro_f1

    workdir, result, _ = tiny_run
    root = workdir.runs_dir / "bench/honesty/tiny/seed3"
    held = pd.read_csv(root / "data" / synth.TEST_LABELS_CSV)
    run = next(r for r in result["runs"] if r["name"] == "pixels-inner")
    test = pd.read_csv(root / "work/runs/pixels-inner/test.csv").set_index("sample_index")
    probs = test.loc[held.sample_index, list(PROB_COLUMNS)].to_numpy()
    assert run["test"] == pytest.approx(macro_f1(held.label.tolist(), probs))
    metrics = json.loads((root / "work/runs/pixels-inner/metrics.json").read_text())
    assert run["oof"] == pytest.approx(metrics["oof_macro_f1"])


def test_held_back_labels_are_read_by_the_bench_only(tiny_run):
    workdir, _, opens = tiny_run
    assert opens, "the bench should have read the held-back labels to score the test set"
    assert all(by_reader for _, by_reader in opens), [p for p, by in opens if not by]
    root = workdir.runs_dir / "bench/honesty/tiny/seed3"
    # what the stages wrote about the test images carries no label
    samples = pd.read_csv(root / "work/runs/patches/32px/test/samples.csv", keep_default_na=False)
    assert (samples.label == "").all()
    for name in ("feature_cache-inner", "pixels-oof"):
        cols = pd.read_csv(root / "work/runs" / name / "test.csv", nrows=1).columns
        assert list(cols) == ["sample_index", *PROB_COLUMNS]


def test_the_stand_in_is_reused_and_loads_as_weights(tiny_run):
    from kit.models.backbones import create_backbone

    workdir, result, _ = tiny_run
    meta = result["standin"]
    create_backbone("tiny_cnn", weights=meta["file"], patch_size=32)  # as --weights FILE
    again = honesty.build_standin(workdir.runs_dir / "bench/honesty/tiny/standin", TINY, 3)
    assert again == meta  # same inputs: not retrained


def _run(seed, path, mode, oof, test, seconds, recorded=None):
    return {"seed": seed, "path": path, "mode": mode, "oof": oof, "test": test,
            "gap": oof - test, "seconds": seconds, "cpu_seconds": 2 * seconds,
            "recorded_mode": recorded or mode}


def test_summary_averages_gaps_and_times_against_the_same_sets_oof_run():
    runs = [_run(1, "pixels", "oof", 0.80, 0.70, 10.0),
            _run(1, "pixels", "inner", 0.70, 0.72, 12.0),
            _run(2, "pixels", "oof", 0.60, 0.64, 20.0),
            _run(2, "pixels", "inner", 0.66, 0.62, 20.0),
            _run(1, "pixels", "auto", 0.70, 0.72, 12.0, recorded="inner")]
    blends = [{"seed": 1, "mode": "inner", "expected": 0.7, "test": 0.75, "gap": -0.05}]
    rows = {(r["path"], r["mode"]): r for r in
            honesty.summarise(runs, blends, ["inner", "oof", "auto"], ["pixels"])}
    inner = rows[("pixels", "inner")]
    assert inner["abs_gap"] == pytest.approx((0.02 + 0.04) / 2)  # mean of |gap|, not |mean|
    assert inner["gap"] == pytest.approx((-0.02 + 0.04) / 2)
    assert inner["seconds_ratio"] == pytest.approx((12 / 10 + 20 / 20) / 2)  # per set, then mean
    assert rows[("pixels", "oof")]["oof"] == pytest.approx(0.70)
    assert rows[("blend", "inner")]["abs_gap"] == pytest.approx(0.05)
    table = honesty.format_table({"preset": "t", "seeds": [1, 2], "seconds": 1.0,
                                  "summary": list(rows.values())})
    assert "(auto = inner)" in table and "loop recorded" not in table


@pytest.mark.parametrize("argv, message", [
    (["--modes", "inner,early"], "--modes: unknown early"),
    (["--paths", "pixel"], "--paths: unknown pixel"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--data", "somewhere"], "generates its own data"),
])
def test_bad_options_stop_with_one_line(tmp_path, capsys, argv, message):
    assert main(["bench", "honesty", "--workdir", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before any work
