"""Blend: input checks, provenance, written files and the CLI (the searches: test_blend_search)."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from blend_data import make_blend_workdir
from kit import CLASSES
from kit.cli import main
from kit.config import load_config
from kit.ensemble.blend import complete_backbones, load_inputs
from kit.metrics import macro_f1
from kit.submission.blend_output import run_blend
from kit.submission.package import validate_submission
from kit.utils import KitError


@pytest.fixture
def workdir(tmp_path):
    return make_blend_workdir(tmp_path)


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
    res = run_blend(paths, data, load_config("blend"), name="first", seed=3)
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
    second = run_blend(paths, data, load_config("blend"), name="first", weight_views=True)
    assert second.csv_path != res.csv_path                  # same second: a -2 suffix
    assert (sub / "latest.csv").read_bytes() == second.csv_path.read_bytes()
    assert not [p for p in sub.iterdir() if p.name.endswith(".tmp")]


def test_run_blend_refuses_bad_name(workdir):
    with pytest.raises(KitError, match="--name"):
        run_blend(*workdir, load_config("blend"), name="../x")


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


def test_the_blend_stage_of_all_and_demo(workdir, capsys):
    from kit.commands.all_run import AllOptions, _blend

    paths, data = workdir
    line = _blend(paths, data, load_config("blend"), ["bb_a", "bb_b", "bb_c"],
                  AllOptions(name="demo"))
    assert "_demo.csv (40 rows, validated)" in line and "latest.csv" in line
    out = capsys.readouterr().out  # the blend's summary
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
    assert "expected macro F1 (nested): " in out and "OPTIMISTIC" not in out
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
    line = next(x for x in out.splitlines() if x.startswith("expected macro F1"))
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
    res = run_blend(paths, data, load_config("blend"), seed=1)
    assert res.expected["label"] == "optimistic" and set(res.expected["why"]) == {
        "bb_a", "bb_b", "bb_c"}
    assert "not recorded (an older cv)" in "; ".join(res.expected["why"]["bb_a"])
    from kit.ensemble.blend_summary import format_summary

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


def test_expected_score_is_printed_and_stored_with_its_interval(workdir, capsys):
    paths, data = workdir
    assert main(["blend", "--data", str(data), "--workdir", str(paths.root)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((paths.submissions_dir / "latest.json").read_text())
    run_dir = json.loads((paths.runs_dir / "blend" / "blend.json").read_text())
    lo, hi = manifest["expected_ci95"]
    assert lo <= manifest["expected_score"]["macro_f1"] <= hi
    assert run_dir["expected_ci95"] == manifest["expected_ci95"] == \
        manifest["scores"]["nested"]["ci95"]
    line = next(x for x in out.splitlines() if x.startswith("expected macro F1"))
    assert f"expected macro F1 (nested): {manifest['expected_score']['macro_f1']:.3f} " \
           f"[{lo:.2f}, {hi:.2f}]" in line
    number = r"\d\.\d{3} \[\d\.\d\d, \d\.\d\d\]"
    for label in ("best single", "equal weights"):
        assert re.search(rf"  {label}.*{number}", out)
    for label in ("blend, argmax", "blend \\+ class biases"):  # in-sample and nested
        assert re.search(rf"  {label}\s+{number}\s+{number}$", out, re.M)
    assert re.search(r"bias gain \(paired\)\s+[+-]\d\.\d{3} \[[+-]\d\.\d\d, [+-]\d\.\d\d\]", out)
    assert manifest["blend"]["prior"]["mode"] == "train"
    assert "test class mix" not in out


def test_prior_em_is_printed_recorded_and_reproduced(tmp_path, capsys):
    from kit.submission.reproduce import run_reproduce

    # many more Triple negative test images than in training: EM sees the shift
    paths, data = make_blend_workdir(tmp_path, n_train=300, n_test=200,
                                     test_prior=(0.1, 0.1, 0.2, 0.6))
    assert main(["blend", "--data", str(data), "--workdir", str(paths.root),
                 "--set", "prior=em"]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((paths.submissions_dir / "latest.json").read_text())
    prior = manifest["blend"]["prior"]
    assert prior["mode"] == "em" and manifest["blend"]["params"]["prior"] == "em"
    assert prior["shifted"] is True and prior["p_value"] < prior["alpha"] == 0.01
    assert prior["test_mix"] == prior["em_mix"] and prior["em_mix"]["Triple negative"] > 0.4
    assert sum(prior["test_mix"].values()) == pytest.approx(1.0)
    assert prior["train_mix"] == {c: float(np.mean(np.array(
        pd.read_csv(paths.folds_csv).label) == c)) for c in CLASSES}
    mix = ", ".join(f"{c} {prior['em_mix'][c]:.3f}" for c in CLASSES)
    assert f"test class mix by EM ({prior['em_iterations']} steps): {mix}" in out
    assert "the test labels are decided for EM's mix" in out
    assert "class biases applied for it" in out
    run_dir = json.loads((paths.runs_dir / "blend" / "blend.json").read_text())
    assert run_dir["prior"] == prior
    assert all("em_mix" in f for f in run_dir["fold_fits"].values())
    test = pd.read_csv(paths.runs_dir / "blend" / "test_blend.csv")
    assert np.allclose(test[[f"p_{c}" for c in CLASSES]].sum(axis=1), 1, atol=1e-5)
    assert (test.label == "Triple negative").mean() > 0.4
    assert run_reproduce(None, None, None,
                         manifest=paths.submissions_dir / "latest.json").identical
    assert main(["blend", "--data", str(data), "--workdir", str(paths.root),
                 "--set", "prior=mixed"]) == 2
    assert "prior = 'mixed' is not allowed: one of train, em" in capsys.readouterr().err


def test_prior_em_keeps_the_training_mix_without_a_clear_shift(workdir, capsys):
    paths, data = workdir
    train = run_blend(paths, data, load_config("blend"), name="train")
    em = run_blend(paths, data, load_config("blend", {"prior": "em"}), name="em")
    record = em.prior_record()
    assert record["shifted"] is False and record["test_mix"] == record["train_mix"]
    assert em.csv_path.read_bytes() == train.csv_path.read_bytes()
    from kit.ensemble.blend_summary import format_summary

    assert "no clear shift, the OOF mix is kept" in format_summary(em)
    assert "test class mix" not in format_summary(train)


def test_bench_blend_scores_expected_vs_test_per_prior(capsys):
    assert main(["bench", "blend", "--repeats", "1", "--images", "200", "--seeds", "2",
                 "--test-mix", "1,1,1,2", "--fold-noise", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "2 generated problems (seeds 42..43)" in out and "0.20, 0.20, 0.20, 0.40" in out
    assert re.search(r"^  train .*\+0\.0000 \+- 0\.0000", out, re.M)
    assert re.search(r"^  em ", out, re.M)
    assert main(["bench", "blend", "--repeats", "1", "--seeds", "1", "--test-mix", "1,2"]) == 2
    assert "--test-mix '1,2': give 4 positive shares" in capsys.readouterr().err
