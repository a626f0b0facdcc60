"""``./run.sh demo`` end to end, as a user runs it: every stage on the built-in demo data."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_sh_demo_runs_every_stage_and_writes_a_valid_submission(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "KIT_PROGRESS": "off"}
    done = subprocess.run([str(REPO / "run.sh"), "demo", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    for stage in ("demo data", "clean", "patches", "folds", "cv", "tune", "blend", "report"):
        assert any(line.startswith(stage) for line in done.stdout.splitlines()), stage
    sub = pd.read_csv(out / "submissions" / "latest.csv")
    tests = sorted(p.name for p in (out / "data" / "test_data").glob("img_*.png"))
    assert list(sub.columns) == ["sample_index", "label"] and sorted(sub.sample_index) == tests
    metrics = json.loads((out / "runs" / "tiny_cnn" / "metrics.json").read_text())
    assert metrics["oof_macro_f1"] > 0.5  # well above chance (0.25) on the demo's signal
    assert metrics["selection"]["epochs_honest"]
    assert (out / "runs" / "report.html").stat().st_size > 10_000
