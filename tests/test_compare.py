"""``./run.sh compare RUN_A RUN_B``: a paired bootstrap of two cv runs' OOF macro F1 on small
generated oof.csv files (no training), and one clear error line per mismatch."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kit import CLASSES, PROB_COLUMNS
from kit.cli import main
from kit.ensemble.compare import compare_runs
from kit.metrics import bootstrap_ci, macro_f1, paired_bootstrap
from kit.paths import Paths
from kit.utils import KitError, atomic_write_json

N = 200
SHA = "a" * 64


def _labels(seed=0):
    rng = np.random.default_rng(seed)
    return [f"img_{i:04d}.png" for i in range(N)], rng.integers(0, 4, N), np.arange(N) % 5


def _probs(y, accuracy, seed):
    """Probabilities whose argmax is right on about ``accuracy`` of the images."""
    rng = np.random.default_rng(seed)
    pred = np.where(rng.random(len(y)) < accuracy, y, (y + rng.integers(1, 4, len(y))) % 4)
    p = rng.dirichlet(np.ones(4), len(y)) * 0.5
    p[np.arange(len(y)), pred] += 0.6
    return p / p.sum(axis=1, keepdims=True)


def write_run(folder, ids, y, folds, probs, sha=SHA, metrics=True):
    folder.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"sample_index": ids, "fold": folds, "label": [CLASSES[i] for i in y]})
    df[PROB_COLUMNS] = probs
    df.to_csv(folder / "oof.csv", index=False)
    if metrics:
        record = {"oof_macro_f1": macro_f1(y, probs),
                  "selection": {"early_stopping": "inner", "epochs_honest": True},
                  "params_source": {"honest": True, "description": "defaults"}}
        if sha:
            record["folds_sha256"] = sha
        atomic_write_json(folder / "metrics.json", record)
    return folder


@pytest.fixture
def work(tmp_path):
    """runs/weak and runs/strong (clearly better), runs/twin (weak's predictions, shuffled)."""
    paths = Paths.from_root(tmp_path / "w")
    ids, y, folds = _labels()
    weak, strong = _probs(y, 0.45, seed=1), _probs(y, 0.8, seed=2)
    write_run(paths.backbone_dir("weak"), ids, y, folds, weak)
    write_run(paths.backbone_dir("strong"), ids, y, folds, strong)
    order = np.random.default_rng(3).permutation(N)
    write_run(paths.backbone_dir("twin"), [ids[i] for i in order], y[order], folds[order],
              weak[order])
    return paths, ids, y, folds, weak, strong


def _compare(paths, *args, capsys):
    rc = main(["compare", *map(str, args), "--workdir", str(paths.root)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_prints_the_paired_difference_with_its_interval_and_writes_json(work, capsys, tmp_path):
    paths, ids, y, folds, weak, strong = work
    out_json = tmp_path / "cmp.json"
    rc, out, err = _compare(paths, "weak", "strong", "--n-boot", 300, "--json", out_json,
                            capsys=capsys)
    assert rc == 0 and not err
    r = json.loads(out_json.read_text())
    expected = paired_bootstrap(y, weak, strong, n_boot=300, seed=0)
    for key in ("a", "b", "diff", "ci95", "p_b_better", "n", "n_boot"):
        assert r[key] == pytest.approx(expected[key])
    assert r["a_ci95"] == pytest.approx(list(bootstrap_ci(y, weak, n_boot=300, seed=0)))
    assert r["run_a"] == "weak" and r["run_b"] == "strong" and r["seed"] == 0
    lo, hi = r["ci95"]
    assert 0 < lo < r["diff"] < hi and r["p_b_better"] > 0.99
    line = next(x for x in out.splitlines() if x.startswith("OOF macro F1: A weak "))
    assert f"B strong {r['b']:.3f} [{r['b_ci95'][0]:.2f}, {r['b_ci95'][1]:.2f}]" in line
    assert f"B - A = {r['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}], P(B > A) = 1.00" in line
    assert line.endswith(f"over {N} images (paired bootstrap, 300 resamples)")
    assert "strong scores above weak beyond the noise" in out
    assert "not distinguishable" not in out


def test_rows_are_paired_by_image_whatever_their_order(work, capsys):
    paths, ids, y, folds, weak, strong = work
    r = compare_runs("weak", "twin", paths, n_boot=200)
    assert r["diff"] == 0 and r["ci95"] == [0.0, 0.0] and r["p_b_better"] == 0.5
    assert r["reading"].startswith("reading: not distinguishable from noise")
    # and the same call is deterministic; another seed moves the interval only
    assert compare_runs("weak", "twin", paths, n_boot=200) == r
    a = compare_runs("weak", "strong", paths, n_boot=200, seed=1)
    b = compare_runs("weak", "strong", paths, n_boot=200, seed=2)
    assert a["diff"] == b["diff"] and a["ci95"] != b["ci95"]


def test_a_small_difference_reads_as_noise(tmp_path, capsys):
    paths = Paths.from_root(tmp_path / "w")
    ids, y, folds = _labels()
    a = _probs(y, 0.5, seed=1)
    b = a.copy()
    fix = np.flatnonzero(a.argmax(1) != y)[:3]  # three more images right: well within noise
    b[fix] = np.eye(4)[y[fix]]
    write_run(paths.backbone_dir("a"), ids, y, folds, a)
    write_run(paths.backbone_dir("b"), ids, y, folds, b)
    rc, out, _ = _compare(paths, "a", "b", capsys=capsys)
    assert rc == 0 and "1000 resamples" in out
    assert "reading: not distinguishable from noise" in out


def test_runs_given_as_folders_and_without_metrics(work, capsys, tmp_path):
    paths, ids, y, folds, weak, strong = work
    elsewhere = write_run(tmp_path / "elsewhere" / "strong", ids, y, folds, strong,
                          metrics=False)
    r = compare_runs("weak", str(elsewhere), paths, n_boot=100)
    assert r["run_b"] == "strong" and r["oof_b"] == str(elsewhere / "oof.csv")
    assert any("folds compared by the fold column" in n for n in r["notes"])
    # two folders of the same name keep what was typed
    r = compare_runs(str(paths.backbone_dir("strong")), str(elsewhere), paths, n_boot=50)
    assert r["run_a"] != r["run_b"]


def test_an_optimistic_run_is_noted(work, capsys):
    paths, ids, y, folds, weak, strong = work
    m = json.loads((paths.backbone_dir("strong") / "metrics.json").read_text())
    m["selection"] = {"early_stopping": "oof", "epochs_honest": False}
    atomic_write_json(paths.backbone_dir("strong") / "metrics.json", m)
    rc, out, _ = _compare(paths, "weak", "strong", "--n-boot", 50, capsys=capsys)
    assert rc == 0 and "note: strong's OOF score is optimistic (epochs chosen on its own" in out


def _error(paths, capsys, *args):
    rc, out, err = _compare(paths, *args, capsys=capsys)
    assert rc == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # one line, naming the file and the fix
    return err


def test_other_images_labels_or_folds_are_refused_with_the_file_and_fix(work, capsys):
    paths, ids, y, folds, weak, strong = work
    write_run(paths.backbone_dir("fewer"), ids[:-2], y[:-2], folds[:-2], strong[:-2])
    err = _error(paths, capsys, "weak", "fewer")
    assert "runs/fewer/oof.csv: covers other images than" in err
    assert "2 only in A, e.g. img_0198.png, img_0199.png; 0 only in B" in err
    assert "rerun ./run.sh cv for both on the same folds/folds.csv" in err

    relabelled = y.copy()
    relabelled[:4] = (relabelled[:4] + 1) % 4
    write_run(paths.backbone_dir("relabelled"), ids, relabelled, folds, strong)
    err = _error(paths, capsys, "weak", "relabelled")
    assert "runs/relabelled/oof.csv: 4 images have another label" in err

    write_run(paths.backbone_dir("refolded"), ids, y, folds, strong, sha="b" * 64)
    err = _error(paths, capsys, "weak", "refolded")
    assert "runs/refolded/metrics.json: trained on another folds file" in err
    assert "bbbbbbbbbbbb... vs aaaaaaaaaaaa..." in err

    write_run(paths.backbone_dir("moved"), ids, y, (folds + 1) % 5, strong, sha=None)
    err = _error(paths, capsys, "weak", "moved")
    assert f"runs/moved/oof.csv: {N} images are in another fold" in err


def test_missing_or_broken_runs_and_bad_options(work, capsys):
    paths, ids, y, folds, weak, strong = work
    err = _error(paths, capsys, "weak", "phikon")
    assert "phikon: neither" in err and "runs/phikon/oof.csv" in err
    assert "runs with an oof.csv: strong, twin, weak" in err and "./run.sh cv phikon" in err
    err = _error(paths, capsys, "weak", "weak")
    assert "the same run" in err
    broken = paths.backbone_dir("broken")
    broken.mkdir()
    pd.read_csv(paths.backbone_dir("weak") / "oof.csv").drop(columns=["fold"]).to_csv(
        broken / "oof.csv", index=False)
    err = _error(paths, capsys, "weak", "broken")
    assert "runs/broken/oof.csv: missing column(s) fold" in err
    err = _error(paths, capsys, "weak", "strong", "--n-boot", 0)
    assert "--n-boot must be >= 1" in err
    with pytest.raises(KitError, match="duplicate sample_index"):
        write_run(paths.backbone_dir("dup"), ids[:1] + ids[:-1], y, folds, strong)
        compare_runs("weak", "dup", paths)
