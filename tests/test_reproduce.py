"""reproduce: a blend re-run from its manifest is byte-identical, and mismatches are explained."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from blend_data import make_blend_workdir
from kit import CLASSES
from kit.cli import main
from kit.config import load_config
from kit.submission.blend_output import run_blend
from kit.submission.reproduce import infer_workdir, run_reproduce
from kit.utils import KitError


def reproduce(manifest, data=None, **kwargs):
    """run_reproduce with the work directory inferred from the manifest, as the command does
    without --workdir."""
    return run_reproduce(None, data, None, manifest=manifest, **kwargs)


@pytest.fixture
def blended(tmp_path):
    paths, data = make_blend_workdir(tmp_path)
    return paths, data, run_blend(paths, data, load_config("blend"), name="rep",
                                  weight_views=True, seed=5)


def test_identical_from_manifest_and_latest(blended, tmp_path):
    paths, data, res = blended
    before = {p.name: p.read_bytes() for p in paths.submissions_dir.iterdir()}
    for manifest in (res.manifest_path, paths.submissions_dir / "latest.json"):
        report = reproduce(manifest, out=tmp_path / "again.csv")
        assert report.identical, report.differences
        assert report.differences == []
        assert (tmp_path / "again.csv").read_bytes() == res.csv_path.read_bytes()
    # Nothing under submissions/ was touched by the re-run.
    assert {p.name: p.read_bytes() for p in paths.submissions_dir.iterdir()} == before
    assert infer_workdir(res.manifest_path, {}) == paths.root


def test_cli_exit_codes(blended, capsys):
    paths, data, res = blended
    assert main(["reproduce", str(res.manifest_path)]) == 0
    assert "identical" in capsys.readouterr().out
    test_csv = paths.backbone_dir("bb_b") / "tta" / "test_orig.csv"
    _scramble(test_csv)
    assert main(["reproduce", str(res.manifest_path)]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "runs/bb_b/tta/test_orig.csv: changed" in out
    assert main(["reproduce", str(paths.root / "nope.json")]) == 2


def test_an_explicit_workdir_wins_even_when_it_is_the_default(blended, tmp_path, monkeypatch,
                                                              capsys):
    """``--workdir .`` is the default's value, but given: the blend re-runs there."""
    paths, data, res = blended
    copy = tmp_path / "copy"
    shutil.copytree(paths.root, copy)
    _scramble(copy / "runs" / "bb_b" / "tta" / "test_orig.csv")
    monkeypatch.chdir(copy)
    assert main(["reproduce", str(res.manifest_path), "--workdir", "."]) == 1
    assert "runs/bb_b/tta/test_orig.csv: changed" in capsys.readouterr().out
    assert main(["reproduce", str(res.manifest_path)]) == 0  # inferred: the original
    assert main(["reproduce", str(res.manifest_path), "--workdir", str(paths.root)]) == 0
    capsys.readouterr()


def _scramble(path):
    """Rotate each row's probabilities: same file shape, different predictions."""
    df = pd.read_csv(path)
    cols = [f"p_{c}" for c in CLASSES]
    df[cols] = np.roll(df[cols].to_numpy(), 1, axis=1)
    df.to_csv(path, index=False, float_format="%.6f", lineterminator="\n")


def test_tampered_input_is_named_with_differing_rows(blended):
    paths, data, res = blended
    for bb in ("bb_a", "bb_b", "bb_c"):
        for view in ("hflip", "orig"):
            _scramble(paths.backbone_dir(bb) / "tta" / f"test_{view}.csv")
    report = reproduce(res.manifest_path)
    assert not report.identical
    changed = [d for d in report.differences if d.startswith("input ")]
    assert len(changed) == 6 and all(": changed (sha256 " in d for d in changed)
    rows = [d for d in report.differences if d.startswith("row img_")]
    assert rows, report.differences
    recorded = dict(pd.read_csv(res.csv_path).values)
    sid = rows[0].split()[1].rstrip(":")
    assert f"recorded {recorded[sid]!r}, reproduced" in rows[0]


def test_tampered_oof_changes_weights_and_is_reported(blended):
    paths, data, res = blended
    _scramble(paths.backbone_dir("bb_a") / "tta" / "oof_orig.csv")
    report = reproduce(res.manifest_path)
    assert not report.identical
    assert report.differences[0].startswith("input runs/bb_a/tta/oof_orig.csv: changed")
    # The refitted weights and biases are named beside the rows they changed.
    assert any(d.startswith("weight bb_a/orig: recorded ") for d in report.differences)
    assert any(d.startswith("row img_") for d in report.differences)


def test_edited_recorded_csv_is_a_mismatch(blended):
    paths, data, res = blended
    lines = res.csv_path.read_text().splitlines(keepends=True)
    sid, label = lines[3].strip().split(",")
    other = next(c for c in CLASSES if c != label)
    lines[3] = f"{sid},{other}\n"
    res.csv_path.write_text("".join(lines))
    report = reproduce(res.manifest_path)
    assert not report.identical
    assert any("edited after the blend wrote it" in d for d in report.differences)
    assert f"row {sid}: recorded {other!r}, reproduced {label!r}" in report.differences


def test_changed_folds_file_cannot_rerun(blended):
    paths, data, res = blended
    folds = pd.read_csv(paths.folds_csv)
    folds.loc[0, "fold"] = (folds.loc[0, "fold"] + 1) % 5
    folds.to_csv(paths.folds_csv, index=False, lineterminator="\n")
    report = reproduce(res.manifest_path)
    assert not report.identical
    assert any(d.startswith(f"{paths.folds_csv}: changed") for d in report.differences)
    assert any("could not be re-run" in d for d in report.differences)
    assert sum("another folds file" in d for d in report.differences) == 3


def test_new_test_image_is_reported(blended):
    paths, data, res = blended
    (data / "test_data" / "img_0999.png").write_bytes(b"png")
    report = reproduce(res.manifest_path)
    assert not report.identical
    assert any(d.startswith("test file list of") for d in report.differences)


def test_missing_dataset_needs_data(blended, tmp_path):
    paths, data, res = blended
    m = json.loads(res.manifest_path.read_text())
    m["data"]["root"] = str(tmp_path / "moved")
    res.manifest_path.write_text(json.dumps(m))
    with pytest.raises(KitError, match="pass --data"):
        reproduce(res.manifest_path)
    assert reproduce(res.manifest_path, default_data=data).identical
