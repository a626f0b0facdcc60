"""Blend: weight search, class biases, nested honesty, input checks and written files."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from blend_data import make_blend_workdir
from kit import CLASSES
from kit.bench.blend import synthetic_problem
from kit.blend import (apply_rule, complete_backbones, fit_biases, fit_params, greedy_weights,
                       load_inputs, run_blend, search)
from kit.cli import main
from kit.config import load_config
from kit.metrics import macro_f1, macro_f1_batch
from kit.package import validate_submission
from kit.utils import KitError


@pytest.fixture
def cfg():
    return load_config("blend")


@pytest.fixture
def workdir(tmp_path):
    return make_blend_workdir(tmp_path)


def test_macro_f1_batch_matches_kit_metrics():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    preds = rng.integers(0, 4, (20, 60))
    preds[3] = 0                      # one class predicted only
    preds[4] = np.where(y == 3, 2, y)  # a class never predicted
    got = macro_f1_batch(preds, y, 4)
    assert np.allclose(got, [macro_f1(y, p) for p in preds])


@pytest.mark.parametrize("seed", range(4))
def test_weight_search_beats_or_equals_equal_weights_in_sample(cfg, seed):
    p = synthetic_problem(300, 3, seed=seed)
    weights, score = greedy_weights(p["oof"], p["y"], "f1", iterations=40)
    equal = macro_f1(p["y"], p["oof"].mean(axis=0).argmax(axis=1))
    assert np.all(weights >= 0) and weights.sum() == pytest.approx(1.0)
    assert score == pytest.approx(macro_f1(p["y"], np.tensordot(weights, p["oof"], 1).argmax(1)))
    best_single = max(macro_f1(p["y"], q.argmax(axis=1)) for q in p["oof"])
    assert score >= max(equal, best_single) - 1e-12
    res = search(p["oof"], p["y"], p["folds"], cfg, "f1", seed=seed)
    base = res.scores["baselines"]
    assert res.scores["in_sample"]["macro_f1_no_bias"] >= max(
        base["equal_weights"]["macro_f1"], base["best_single"]["macro_f1"]) - 1e-12
    for init in ("equal", "best"):  # each start alone keeps its own guarantee
        w, sc = greedy_weights(p["oof"], p["y"], "f1", iterations=10, init=init)
        assert sc >= (equal if init == "equal" else best_single) - 1e-12


def test_weight_search_moves_weight_off_a_useless_model(cfg):
    p = synthetic_problem(400, 2, seed=3, signal=(1.5, 1.5))
    noise = np.random.default_rng(0).dirichlet(np.ones(4), size=400)
    P = np.concatenate([p["oof"], noise[None]])
    weights, score = greedy_weights(P, p["y"], "f1", iterations=40)
    assert weights[2] < 1 / 3
    assert score > macro_f1(p["y"], P.mean(axis=0).argmax(axis=1))


def test_logloss_objective_lowers_log_loss(cfg):
    p = synthetic_problem(300, 3, seed=1)

    def logloss(w):
        q = np.tensordot(w, p["oof"], 1)[np.arange(300), p["y"]]
        return -np.mean(np.log(q))

    weights, _ = greedy_weights(p["oof"], p["y"], "logloss", iterations=40)
    assert logloss(weights) <= logloss(np.ones(3) / 3)
    res = search(p["oof"], p["y"], p["folds"], cfg, "logloss")
    assert res.fitted.weights.sum() == pytest.approx(1.0)


def test_bias_tuning_raises_macro_f1_where_argmax_is_poor(cfg):
    # The minority class's probability is under-scaled 8x: argmax almost never predicts it.
    p = synthetic_problem(581, 1, seed=5, minority_scale=0.12, signal=(2.0,))
    probs, y = p["oof"][0], p["y"]
    before = macro_f1(y, probs.argmax(axis=1))
    b = fit_biases(probs, y, cfg)
    after = macro_f1(y, apply_rule(probs, b, cfg["eps"]))
    assert b[0] == 0
    assert b[3] > 0.5 and b[3] == b.max()  # the biases favour the minority class
    assert after > before + 0.05
    # ... and the gain holds on rows the biases never saw (nested).
    res = search(p["oof"], y, p["folds"], cfg)
    assert res.scores["nested"]["macro_f1"] > res.scores["nested"]["macro_f1_no_bias"] + 0.02


def test_bias_search_keeps_zero_when_nothing_to_gain(cfg):
    y = np.repeat(np.arange(4), 10)
    probs = np.full((40, 4), 0.1)
    probs[np.arange(40), y] = 0.7          # argmax is already perfect
    assert np.all(fit_biases(probs, y, cfg) == 0)


def test_nested_score_is_reported_and_honest(cfg):
    p = synthetic_problem(300, 3, seed=2)
    res = search(p["oof"], p["y"], p["folds"], cfg, seed=7)
    s = res.scores
    assert s["nested"]["macro_f1"] == pytest.approx(macro_f1(p["y"], res.pred_nested))
    assert s["nested"]["macro_f1"] != pytest.approx(s["in_sample"]["macro_f1"])
    assert s["gap"] == pytest.approx(s["in_sample"]["macro_f1"] - s["nested"]["macro_f1"])
    # Held-out fold predictions never depend on that fold's labels: scramble them and refit.
    k = 0
    held = p["folds"] == k
    y2 = p["y"].copy()
    y2[held] = np.random.default_rng(0).permutation(4)[y2[held]]
    res2 = search(p["oof"], y2, p["folds"], cfg, seed=7)
    assert np.array_equal(res.pred_nested[held], res2.pred_nested[held])
    # ... and they are what a fit on the other folds predicts.
    fit = fit_params(p["oof"][:, ~held], p["y"][~held], cfg, "f1", None)
    expect = apply_rule(np.tensordot(fit.weights, p["oof"][:, held], 1), fit.biases, cfg["eps"])
    assert np.array_equal(res.pred_nested[held], expect)


def test_search_is_deterministic_with_bags(cfg):
    p = synthetic_problem(200, 3, seed=4)
    bagged = {**cfg, "bags": 5}
    a = search(p["oof"], p["y"], p["folds"], bagged, seed=1)
    b = search(p["oof"], p["y"], p["folds"], bagged, seed=1)
    assert np.array_equal(a.fitted.weights, b.fitted.weights)
    assert np.array_equal(a.pred_nested, b.pred_nested)


def test_load_inputs_aligns_and_hashes(workdir):
    paths, data = workdir
    assert complete_backbones(paths) == ["bb_a", "bb_b", "bb_c"]
    inputs = load_inputs(paths, data)
    assert inputs.oof.shape == (3, 150, 4) and inputs.test.shape == (3, 40, 4)
    assert np.allclose(inputs.oof.sum(axis=2), 1)
    assert sorted(inputs.files) == sorted(f"runs/{b}/{f}" for b in ("bb_a", "bb_b", "bb_c")
                                          for f in ("oof.csv", "test.csv", "metrics.json"))
    views = load_inputs(paths, data, ["bb_a", "bb_c"], weight_views=True)
    assert views.models == ["bb_a/hflip", "bb_a/orig", "bb_c/hflip", "bb_c/orig"]


def test_refuses_backbone_from_other_folds_file(workdir):
    paths, data = workdir
    metrics = paths.backbone_dir("bb_b") / "metrics.json"
    m = json.loads(metrics.read_text())
    m["folds_sha256"] = "0" * 64
    metrics.write_text(json.dumps(m))
    with pytest.raises(KitError, match=r"bb_b.*another folds file.*cv bb_b"):
        load_inputs(paths, data)
    assert load_inputs(paths, data, ["bb_a", "bb_c"]).backbones == ["bb_a", "bb_c"]


def test_refuses_changed_folds_file(workdir):
    paths, data = workdir
    folds = pd.read_csv(paths.folds_csv)
    folds.loc[0, "fold"] = (folds.loc[0, "fold"] + 1) % 5
    folds.to_csv(paths.folds_csv, index=False, lineterminator="\n")
    with pytest.raises(KitError, match="3 backbones cannot be blended") as exc:
        load_inputs(paths, data)
    assert all("another folds file" in p for p in exc.value.problems)


def test_refuses_different_oof_images(workdir):
    paths, data = workdir
    oof = paths.backbone_dir("bb_c") / "oof.csv"
    df = pd.read_csv(oof)
    df.iloc[1:].to_csv(oof, index=False)
    with pytest.raises(KitError, match="bb_c/oof.csv: covers different images") as exc:
        load_inputs(paths, data)
    assert any("img_0000.png" in p for p in exc.value.problems)


def test_refuses_test_rows_not_matching_test_data(workdir):
    paths, data = workdir
    (data / "test_data" / "img_0040.png").write_bytes(b"png")  # a test image no model saw
    with pytest.raises(KitError, match="test.csv: covers different images than test_data") as exc:
        load_inputs(paths, data)
    assert any("missing: img_0040.png" in p for p in exc.value.problems)


def test_refuses_missing_files_and_empty_runs(workdir, tmp_path):
    paths, data = workdir
    (paths.backbone_dir("bb_a") / "test.csv").unlink()
    assert complete_backbones(paths) == ["bb_b", "bb_c"]
    with pytest.raises(KitError, match="missing") as exc:
        load_inputs(paths, data, ["bb_a", "bb_b"])
    assert any("bb_a/test.csv" in p for p in exc.value.problems)
    from kit.paths import Paths

    with pytest.raises(KitError, match="run ./run.sh cv"):
        load_inputs(Paths.from_root(tmp_path / "empty"), data)


def test_refuses_mismatched_tta_views(workdir):
    paths, data = workdir
    (paths.backbone_dir("bb_a") / "tta" / "test_hflip.csv").unlink()
    with pytest.raises(KitError, match="TTA views differ"):
        load_inputs(paths, data, weight_views=True)


def test_run_blend_writes_submission_latest_and_run_dir(workdir):
    paths, data = workdir
    res = run_blend(paths, data, name="first", seed=3)
    sub = paths.submissions_dir
    assert res.csv_path.parent == sub and res.csv_path.name.endswith("_first.csv")
    assert validate_submission(res.csv_path, data / "test_data", CLASSES) == []
    assert (sub / "latest.csv").read_bytes() == res.csv_path.read_bytes()
    assert not (sub / "latest.csv").is_symlink()
    assert json.loads((sub / "latest.json").read_text()) == json.loads(
        res.manifest_path.read_text())
    blend = json.loads((paths.runs_dir / "blend" / "blend.json").read_text())
    assert blend["weights"] == res.weights and blend["biases"] == res.biases
    assert blend["scores"]["nested"]["macro_f1"] == res.scores["nested"]["macro_f1"]
    assert (paths.runs_dir / "blend" / "config.yaml").exists()
    oof = pd.read_csv(paths.runs_dir / "blend" / "oof_blend.csv")
    assert len(oof) == 150 and macro_f1(oof.label.to_numpy(), oof.pred_nested.to_numpy()) == \
        pytest.approx(res.scores["nested"]["macro_f1"])
    second = run_blend(paths, data, name="first", weight_views=True)
    assert second.csv_path != res.csv_path                  # same second: a -2 suffix
    assert (sub / "latest.csv").read_bytes() == second.csv_path.read_bytes()
    assert not [p for p in sub.iterdir() if p.name.endswith(".tmp")]


def test_run_blend_refuses_bad_name(workdir):
    with pytest.raises(KitError, match="--name"):
        run_blend(*workdir, name="../x")


def test_cli_blend_prints_baselines_nested_and_paths(workdir, capsys):
    paths, data = workdir
    rc = main(["blend", "bb_a", "bb_b", "--data", str(data), "--workdir", str(paths.root),
               "--name", "cli"])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("best single", "equal weights", "blend + class biases", "bias gain",
                 "in-sample (optimistic)", "nested", "submissions/latest.csv", "_cli.csv"):
        assert text in out
    (paths.backbone_dir("bb_a") / "oof.csv").unlink()
    assert main(["blend", "bb_a", "--data", str(data), "--workdir", str(paths.root)]) == 2
    assert "bb_a/oof.csv" in capsys.readouterr().err


def test_bench_blend_prints_time_and_gap(capsys):
    assert main(["bench", "blend", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "search time" in out and "target < 2 s: met" in out
    assert "nested-vs-in-sample gap" in out


def test_every_stale_backbone_is_named(workdir):
    paths, data = workdir
    for bb in ("bb_a", "bb_c"):
        metrics = paths.backbone_dir(bb) / "metrics.json"
        metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "folds_sha256": "1"}))
    with pytest.raises(KitError, match="2 backbones cannot be blended") as exc:
        load_inputs(paths, data)
    assert len(exc.value.problems) == 2
    assert "runs/bb_a/metrics.json" in exc.value.problems[0]
    assert "runs/bb_c/metrics.json" in exc.value.problems[1]


def test_demo_blend_step(workdir, tmp_path, capsys):
    from kit.commands.demo import _blend
    from kit.paths import Paths

    paths, data = workdir
    _blend(Paths.from_root(tmp_path / "nothing"), data, 42)
    assert "blend          skipped" in capsys.readouterr().out
    _blend(paths, data, 42)
    out = capsys.readouterr().out
    assert "_demo.csv (40 rows, validated)" in out and "latest.csv" in out
    assert "nested" in out and "in-sample" in out


def _record(paths, bb, early_stopping="inner", params_honest=True):
    """Give ``runs/<bb>/metrics.json`` the records a current cv writes."""
    path = paths.backbone_dir(bb) / "metrics.json"
    m = json.loads(path.read_text())
    m["selection"] = {"early_stopping": early_stopping,
                      "epochs_honest": early_stopping != "oof"}
    m["params_source"] = (
        {"spec": "none", "description": "defaults (no params file)", "honest": True,
         "why": "no tuned parameters"} if params_honest else
        {"spec": "tuned", "description": "runs/tune/x/best.yaml (3 values)", "honest": False,
         "why": "chosen as the best of 30 trials scored on these folds' OOF rows",
         "dropped": ["lr"]})
    path.write_text(json.dumps(m))


def test_expected_score_is_optimistic_exactly_when_an_input_is(workdir, capsys):
    paths, data = workdir
    args = ["blend", "--data", str(data), "--workdir", str(paths.root)]

    def blend():
        assert main(args) == 0
        out = capsys.readouterr().out
        return out, json.loads((paths.submissions_dir / "latest.json").read_text())

    for bb in ("bb_a", "bb_b", "bb_c"):
        _record(paths, bb)
    out, manifest = blend()
    assert "expected score (nested macro F1)" in out and "OPTIMISTIC" not in out
    assert "every input chose its epochs and params without its own OOF rows" in out
    assert manifest["expected_score"]["label"] == "expected"
    assert manifest["expected_score"]["macro_f1"] == manifest["scores"]["nested"]["macro_f1"]
    for bb in ("bb_a", "bb_b", "bb_c"):  # per input: how its epochs and params were chosen
        b = manifest["backbones"][bb]
        assert b["honest"] is True and b["why"] == []
        assert b["selection"]["early_stopping"] == "inner"
        assert b["params_source"]["spec"] == "none" and b["epochs"].startswith("inner")

    _record(paths, "bb_b", early_stopping="oof")
    out, manifest = blend()
    line = next(x for x in out.splitlines() if x.startswith("expected score"))
    assert "OPTIMISTIC" in line
    assert "  bb_b: epochs chosen on its own OOF rows (early_stopping oof)" in out
    assert "  bb_a:" not in out and "  bb_c:" not in out
    assert manifest["expected_score"]["label"] == "optimistic"
    assert list(manifest["expected_score"]["why"]) == ["bb_b"]
    assert manifest["backbones"]["bb_b"]["honest"] is False
    run_dir = json.loads((paths.runs_dir / "blend" / "blend.json").read_text())
    assert run_dir["expected_score"]["label"] == "optimistic"
    assert run_dir["inputs_provenance"]["bb_a"]["honest"] is True

    _record(paths, "bb_b")
    _record(paths, "bb_c", params_honest=False)  # tuned on these folds: optimistic too
    out, manifest = blend()
    assert "  bb_c: params chosen as the best of 30 trials" in out and "  bb_b:" not in out
    assert "dropped for this path: lr" in manifest["backbones"]["bb_c"]["params"]


def test_inputs_from_an_older_cv_are_unknown_hence_optimistic(workdir):
    paths, data = workdir  # blend_data's metrics.json have no selection/params_source
    res = run_blend(paths, data, seed=1)
    assert res.expected["label"] == "optimistic" and set(res.expected["why"]) == {
        "bb_a", "bb_b", "bb_c"}
    assert "not recorded (an older cv)" in "; ".join(res.expected["why"]["bb_a"])
    from kit.blend import format_summary

    assert "OPTIMISTIC" in format_summary(res)


def test_a_collapsed_input_with_weight_is_warned_about(workdir, capsys):
    paths, data = workdir
    args = ["blend", "--data", str(data), "--workdir", str(paths.root)]
    assert main(args) == 0
    assert "WARNING" not in capsys.readouterr().out
    weights = json.loads((paths.runs_dir / "blend" / "blend.json").read_text())["weights"]
    heavy = max(weights, key=weights.get).split("/")[0]
    metrics_path = paths.backbone_dir(heavy) / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics.update(collapsed_folds=[2], collapsed=None)
    metrics_path.write_text(json.dumps(metrics))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"WARNING: {heavy} gets weight" in out and "fold(s) 2 collapsed" in out
