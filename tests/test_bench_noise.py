"""``bench noise``: a tiny end-to-end run of the harness (both regimes, the baseline and a
label-issue and a bagging arm), the generator's flipped labels recovered exactly, and the
summary's arithmetic."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from kit import PROB_COLUMNS
from kit.bench import label_truth, noise, noise_summary
from kit.cli import main
from kit.data import synth
from kit.paths import Paths
from kit.utils import KitError

TINY_DATA = dict(n_train=40, n_test=12, short_side=64, long_side_max=128, signal=0.4)
TINY = noise.Preset(
    "tiny", data=TINY_DATA, standin_data={**TINY_DATA, "n_test": 2, "label_noise": 0.1},
    noise={"hard": 0.4, "easy": 0.1},
    patches={"size": 32, "stride": 16, "top_k": 2}, folds={"n_splits": 2},
    train={"epochs": 2, "patience": 0, "inner_folds": 2, "batch_size": 16},
    standin={"epochs": 2}, seeds=1)
ARMS = ["drop", "bag5", "oracle"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = Paths.from_root(tmp_path_factory.mktemp("noise"))
    result = noise.run_noise(workdir, TINY, seeds=[5], arms=ARMS, regimes=["hard", "easy"])
    return workdir, result


def test_every_arm_and_regime_gets_scores_and_a_paired_difference(tiny_run):
    from kit.metrics import macro_f1

    workdir, result = tiny_run
    saved = json.loads((workdir.runs_dir / "bench/noise/tiny/results.json").read_text())
    assert saved["complete"] and saved["arms"] == ["baseline", *ARMS]
    runs = {(r["regime"], r["arm"]): r for r in saved["runs"]}
    assert set(runs) == {(g, a) for g in ("hard", "easy") for a in ("baseline", *ARMS)}
    for (regime, arm), r in runs.items():
        assert 0 <= r["oof"] <= 1 and 0 <= r["test"] <= 1 and 0 <= r["test_clean"] <= 1
        assert r["gap"] == pytest.approx(r["oof"] - r["test"])
        assert r["n_oof"] == r["n_train_rows"]  # OOF scored on every image, dropped ones too
        assert r["n_test"] == TINY_DATA["n_test"] and r["wall_seconds"] >= 0
        if arm == "baseline":
            assert "vs_baseline" not in r
            continue
        vs = r["vs_baseline"]
        assert vs["diff"] == pytest.approx(r["test"] - runs[(regime, "baseline")]["test"])
        assert vs["ci95"][0] <= vs["ci95"][1] and 0 <= vs["p_better"] <= 1
    # the override took: cv recorded what the arm asked for
    assert runs[("hard", "drop")]["recorded"]["label_issues"] == "drop"
    assert runs[("hard", "bag5")]["recorded"]["bag"] == 5
    assert runs[("hard", "baseline")]["recorded"] == {"label_issues": "off", "bag": 1,
                                                      "head_type": "mlp", "pool": "mean_prob"}
    flags = runs[("hard", "drop")]["flags"]  # from cv's fold_k/label_issues.csv
    assert flags["recorded"] and flags["folds"] == TINY.folds["n_splits"]
    assert flags["flagged"] <= flags["assessed"] and flags["true_flags"] <= flags["bad"]
    assert 0 <= flags["share_flagged"] <= 1 and "flags" not in runs[("hard", "bag5")]
    # the oracle trained on the drawn labels, in its own work directory; its OOF is scored on
    # the written labels like every other arm's
    root = workdir.runs_dir / "bench/noise/tiny/hard/seed5"
    oracle_folds = pd.read_csv(root / "oracle/work/folds/folds.csv").set_index("sample_index")
    plan = label_truth.drawn_labels(root / "data")
    assert (oracle_folds.label == plan["train"].loc[oracle_folds.index].drawn).all()
    oof = pd.read_csv(root / "work/runs/noise-oracle/oof.csv")
    assert runs[("hard", "oracle")]["oof"] == pytest.approx(macro_f1(
        plan["train"].loc[oof.sample_index].written.tolist(), oof[list(PROB_COLUMNS)].to_numpy()))
    rows = {(r["regime"], r["arm"]) for r in saved["summary"]}
    assert rows == set(runs)
    assert set(saved["checks"]) == {"hard_drop_gain", "hard_drop_gap", "easy_no_loss"}
    table = noise_summary.format_table(result)
    assert "hard: label_noise 0.4" in table and "easy: label_noise 0.1" in table
    assert "check: drop on hard" in table


def test_test_scores_are_computed_from_the_runs_test_files(tiny_run):
    from kit.metrics import macro_f1

    workdir, result = tiny_run
    root = workdir.runs_dir / "bench/noise/tiny/hard/seed5"
    held = pd.read_csv(root / "data" / synth.TEST_LABELS_CSV)
    run = next(r for r in result["runs"] if (r["regime"], r["arm"]) == ("hard", "bag5"))
    test = pd.read_csv(root / "work/runs/noise-bag5/test.csv").set_index("sample_index")
    probs = test.loc[held.sample_index, list(PROB_COLUMNS)].to_numpy()
    assert run["test"] == pytest.approx(macro_f1(held.label.tolist(), probs))
    metrics = json.loads((root / "work/runs/noise-bag5/metrics.json").read_text())
    assert run["oof"] == pytest.approx(metrics["oof_macro_f1"])


def test_the_hard_regime_flips_more_labels_of_the_same_images(tiny_run):
    _, result = tiny_run
    hard, easy = result["data"]["hard/5"]["noise"], result["data"]["easy/5"]["noise"]
    assert hard["train_real"] == easy["train_real"]
    assert hard["train_flipped"] > easy["train_flipped"]
    # predicting every drawn class scores 1 on unflipped test labels, less on flipped ones
    assert 0 <= hard["test_ceiling"] <= easy["test_ceiling"] <= 1


def test_drawn_labels_recover_exactly_the_flipped_labels(tmp_path):
    data = synth.generate(tmp_path / "d", n_train=30, n_test=10, short_side=48, seed=2,
                          label_noise=0.5, test_labels=True)
    plan = label_truth.drawn_labels(data)
    given = pd.read_csv(data / "train_labels.csv").set_index("sample_index").label
    assert (plan["train"].written.sort_index() == given.sort_index()).all()
    real = plan["train"][plan["train"].kind != "cartoon"]
    assert 0 < (real.drawn != real.written).sum() < len(real)
    assert plan["train"].bad[plan["train"].kind == "cartoon"].all()
    # the test labels written are the drawn ones, flipped where the plan says
    held = synth.read_test_labels(data).set_index("sample_index").label
    assert (plan["test"].written.sort_index() == held.sort_index()).all()
    # a label file that no longer matches the plan stops the bench (it could not say which
    # labels were flipped)
    labels = pd.read_csv(data / "train_labels.csv")
    labels.loc[0, "label"] = next(c for c in synth.CLASSES if c != labels.label[0])
    labels.to_csv(data / "train_labels.csv", index=False)
    with pytest.raises(KitError, match="the generator's plan no longer gives the labels"):
        label_truth.drawn_labels(data)


def test_flag_quality_counts_against_the_flipped_labels(tmp_path):
    plan = {"train": pd.DataFrame({"sample_index": ["a", "b", "c", "d"],
                                   "bad": [True, True, False, False]}).set_index("sample_index")}
    for k, (ids, flagged, quality) in enumerate([(["a", "c"], [1, 1], [0.1, 0.2]),
                                                 (["b", "d"], [0, 0], [0.3, 0.9])]):
        (tmp_path / f"fold_{k}").mkdir()
        pd.DataFrame({"sample_index": ids, "fold": k, "flagged": flagged,
                      "quality": quality}).to_csv(tmp_path / f"fold_{k}/label_issues.csv",
                                                  index=False)
    q = label_truth.flag_quality(tmp_path, plan)
    assert (q["assessed"], q["flagged"], q["bad"], q["true_flags"]) == (4, 2, 2, 1)
    assert q["precision"] == 0.5 and q["recall"] == 0.5 and q["base_rate"] == 0.5
    # quality ranks bad a (0.1), b (0.3) against good c (0.2), d (0.9): 3 of 4 pairs right
    assert q["quality_auc"] == pytest.approx(0.75)
    assert label_truth.flag_quality(tmp_path / "nothing", plan) == {"recorded": False}


def _run(regime, seed, arm, test, oof, diff=None):
    rec = {"regime": regime, "seed": seed, "arm": arm, "test": test, "oof": oof,
           "gap": oof - test, "test_clean": test, "wall_seconds": 1.0, "cpu_seconds": 2.0}
    if diff is not None:
        rec["vs_baseline"] = {"diff": diff, "ci95": [diff - 0.05, diff + 0.05],
                              "diff_clean": diff}
    return rec


def test_summary_and_checks():
    runs = [_run("hard", 1, "baseline", 0.50, 0.52), _run("hard", 2, "baseline", 0.48, 0.46),
            _run("hard", 1, "drop", 0.55, 0.57, 0.05), _run("hard", 2, "drop", 0.50, 0.56, 0.02),
            _run("easy", 1, "baseline", 0.80, 0.80), _run("easy", 1, "drop", 0.79, 0.80, -0.01),
            _run("easy", 1, "bag5", 0.81, 0.80, 0.01), _run("easy", 1, "oracle", 0.7, 0.8, -0.1)]
    rows = {(r["regime"], r["arm"]): r for r in
            noise_summary.summarise(runs, ["baseline", "drop", "bag5", "oracle"], ["hard", "easy"])}
    drop = rows[("hard", "drop")]
    assert drop["diff"] == pytest.approx(0.035) and drop["diff_sd"] == pytest.approx(
        math.sqrt(2 * 0.015 ** 2))
    assert drop["gap"] == pytest.approx((0.02 + 0.06) / 2)
    assert drop["per_seed_test"] == [0.55, 0.50]
    assert math.isnan(rows[("hard", "baseline")]["diff"])
    # pooled interval of the mean: per-seed half-widths 0.05 -> se 0.05/1.96/sqrt(2)
    lo, hi = drop["diff_ci95"]
    assert (lo + hi) / 2 == pytest.approx(0.035) and hi - lo == pytest.approx(
        2 * 0.05 / math.sqrt(2))
    c = noise_summary.checks(list(rows.values()))
    assert c["hard_drop_gain"]["met"] and not c["hard_drop_gap"]["met"]  # gap 0.04 > 0.03
    # the oracle is a bound, not a lever: never in the easy check
    assert not c["easy_no_loss"]["met"] and set(c["easy_no_loss"]["lower"]) == {"drop"}
    assert not c["easy_no_loss"]["lower"]["drop"]["beyond_noise"]  # -0.01 within +-0.05


def test_arm_configs_change_one_thing_on_the_frozen_path():
    base = noise.arm_config("baseline", TINY)
    assert base["train_norm"] == "none" and base["unfreeze_last"] == 0
    # the baseline is the MLP, the default before head.type auto, whatever the default now
    assert base["head"] == {"type": "mlp"}
    assert noise.arm_config("logreg", TINY)["head"] == {"type": "logreg"}
    assert noise.arm_config("drop+bag5", TINY) == {**base, "label_issues": {"mode": "drop"},
                                                   "bag": 5}
    assert noise.run_name("drop+bag5") == "noise-drop-bag5"
    assert noise.run_name("logreg", "weak_hard") == "noise-weak-logreg"


def test_the_weak_regimes_read_the_same_sets_with_their_own_weaker_standin(tmp_path):
    workdir = Paths.from_root(tmp_path)
    preset = noise.Preset(**{**TINY.__dict__, "noise": {**TINY.noise, "weak": 0.1},
                             "standin": {"epochs": 3}, "weak_standin": {"epochs": 1}})
    result = noise.run_noise(workdir, preset, seeds=[5], arms=["logreg"],
                             regimes=["easy", "weak"])
    strong, weak = result["standin"], result["standin_weak"]
    assert strong["file"] != weak["file"] and "standin-weak" in weak["file"]
    runs = {(r["regime"], r["arm"]): r for r in result["runs"]}
    assert runs[("weak", "logreg")]["name"] == "noise-weak-logreg"
    # the same images and labels as the easy set, in its work directory, under other names
    root = workdir.runs_dir / "bench/noise/tiny"
    assert not (root / "weak").exists()
    work = root / "easy/seed5/work/runs"
    assert {"noise-logreg", "noise-weak-logreg", "noise-baseline", "noise-weak-baseline"} <= \
        {p.name for p in work.iterdir()}
    assert runs[("weak", "baseline")]["n_test"] == runs[("easy", "baseline")]["n_test"]
    assert runs[("weak", "logreg")]["recorded"]["head_type"] == "logreg"


@pytest.mark.parametrize("argv, message", [
    (["--arms", "drop,prune"], "--arms: unknown prune"),
    (["--regimes", "medium"], "--regimes: unknown medium"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--hard-noise", "0.8"], "--hard-noise must be in"),
    (["--data", "somewhere"], "generates its own data"),
])
def test_bad_options_stop_with_one_line(tmp_path, capsys, argv, message):
    assert main(["bench", "noise", "--workdir", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before any work
