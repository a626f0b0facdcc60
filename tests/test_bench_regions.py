"""``bench regions``: a tiny end-to-end run (one regime, one seed, both arms on the same folds),
the paired difference read from the runs' test files, and the coverage diagnostic."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from kit import PROB_COLUMNS
from kit.bench import noise, regions
from kit.cli import main
from kit.paths import Paths

TINY_DATA = dict(n_train=40, n_test=12, short_side=96, long_side_max=160, signal=0.4)
TINY = noise.Preset(
    "tiny", data=TINY_DATA, standin_data={**TINY_DATA, "n_test": 2, "label_noise": 0.1},
    noise={"hard": 0.4, "easy": 0.1},
    patches={"size": 32, "stride": 16, "top_k": 4, "min_region_px": 64},
    folds={"n_splits": 2}, train={"epochs": 2, "patience": 0, "inner_folds": 2,
                                  "batch_size": 16},
    standin={"epochs": 2}, seeds=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = Paths.from_root(tmp_path_factory.mktemp("regions"))
    return workdir, regions.run_regions(workdir, TINY, seeds=[3], regimes=["easy"])


@pytest.mark.slow
def test_both_arms_share_folds_and_get_scores_and_a_paired_difference(tiny_run):
    from kit.data import synth
    from kit.metrics import macro_f1

    workdir, result = tiny_run
    root = workdir.runs_dir / "bench/regions/tiny/easy/seed3"
    saved = json.loads((workdir.runs_dir / "bench/regions/tiny/results.json").read_text())
    assert saved["complete"] and [r["arm"] for r in saved["runs"]] == ["top_k", "per_region"]
    top, spread = saved["runs"]
    # same folds, different windows
    assert (root / "work/folds/folds.csv").read_bytes() == \
        (root / "per_region/work/folds/folds.csv").read_bytes()
    assert top["patch_keys"]["train"] != spread["patch_keys"]["train"]
    truth = synth.read_test_labels(root / "data").set_index("sample_index").label
    for rec, sub in ((top, "work"), (spread, "per_region/work")):
        test = pd.read_csv(root / sub / "runs/tiny_cnn/test.csv", dtype={"sample_index": str})
        assert rec["test"] == pytest.approx(macro_f1(truth.loc[test.sample_index].tolist(),
                                                     test[list(PROB_COLUMNS)].to_numpy()))
        assert rec["gap"] == pytest.approx(rec["oof"] - rec["test"])
        assert 0 < rec["coverage"]["share_covered"] <= 1
    assert spread["vs_top_k"]["diff"] == pytest.approx(spread["test"] - top["test"])
    lo, hi = spread["vs_top_k"]["ci95"]
    assert lo <= spread["vs_top_k"]["diff"] <= hi
    # per_region's windows reach every region above the minimum at least as often as top_k's
    assert spread["coverage"]["share_covered"] >= top["coverage"]["share_covered"]
    assert spread["coverage"]["share_covered"] == pytest.approx(1.0)
    table = regions.format_table(result)
    assert "easy: label_noise 0.1" in table and "per_region" in table


def test_summary_pools_the_per_seed_differences():
    runs = [{"regime": "easy", "arm": a, "seed": s, "test": t, "oof": t + 0.05, "gap": 0.05,
             "wall_seconds": 1.0, "coverage": {"share_covered": c, "regions_shown": c * 2},
             **({"vs_top_k": {"diff": d, "ci95": [d - 0.04, d + 0.04]}} if d is not None
                else {})}
            for a, s, t, c, d in (("top_k", 1, 0.60, 0.5, None),
                                  ("per_region", 1, 0.62, 1.0, 0.02),
                                  ("top_k", 2, 0.70, 0.5, None),
                                  ("per_region", 2, 0.66, 1.0, -0.04))]
    rows = {r["arm"]: r for r in regions.summarise(runs, ["easy"])}
    assert rows["top_k"]["test"] == pytest.approx(0.65) and rows["top_k"]["per_seed_diff"] == []
    pr = rows["per_region"]
    assert pr["diff"] == pytest.approx(-0.01) and pr["share_covered"] == pytest.approx(1.0)
    # two independent seeds: the pooled interval is narrower than each seed's
    assert pr["diff_ci95"][1] - pr["diff_ci95"][0] < 0.08
    assert pr["diff_ci95"][0] < -0.01 < pr["diff_ci95"][1]


def test_bench_regions_refuses_data(tmp_path, capsys):
    assert main(["bench", "regions", "--data", str(tmp_path), "--workdir", str(tmp_path)]) == 2
    assert "bench regions generates its own data" in capsys.readouterr().err
