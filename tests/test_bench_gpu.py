"""./run.sh bench gpu: the comparison and report logic on the CPU, the whole bench on the CPU
(--device cpu, tiny backbones), the one-line refusal without CUDA, and the real thing on a
CUDA GPU when there is one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kit.bench import gpu, gpu_report
from kit.bench.gpu import compare_probs, precision_note
from kit.utils import KitError

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU; none on this machine")
without_cuda = pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}


def probs(n, seed):
    x = np.random.default_rng(seed).random((n, 4)) + 0.1
    return x / x.sum(1, keepdims=True)


# --------------------------------------------------------------------------- comparison
def test_compare_probs_measures_the_largest_difference():
    a = probs(50, 0)
    same = compare_probs(a, a.copy(), tol=1e-6)
    assert same == {"max_abs": 0.0, "mean_abs": 0.0, "argmax_agree": 1.0, "tol": 1e-6, "ok": True}
    b = a.copy()
    b[7] = b[7][::-1]  # one row's classes reversed: its top class changes
    d = compare_probs(a, b, tol=1e-3)
    assert d["max_abs"] == pytest.approx(np.abs(a[7] - a[7][::-1]).max())
    assert d["argmax_agree"] == pytest.approx(49 / 50) and not d["ok"]
    near = compare_probs(a, a + 4e-3, tol=5e-3)
    assert near["ok"] and near["max_abs"] == pytest.approx(4e-3)
    # Patch-level arrays (images x patches x classes) compare per patch row.
    assert compare_probs(a.reshape(10, 5, 4), a.reshape(10, 5, 4), 0)["ok"]


def test_compare_probs_refuses_nan_and_mismatched_shapes():
    a = probs(4, 1)
    b = a.copy()
    b[0, 0] = np.nan  # an AMP overflow shows up as NaN: never "within tolerance"
    bad = compare_probs(a, b, tol=1.0)
    assert not bad["ok"] and np.isnan(bad["max_abs"])
    with pytest.raises(ValueError, match="shapes"):
        compare_probs(a, a[:3], tol=1.0)


def test_emulated_bf16_is_flagged():
    assert precision_note("bf16", (8, 0)) is None  # Ampere and later: native
    assert precision_note("bf16", (9, 0)) is None
    assert precision_note("fp16", (7, 5)) is None
    note = precision_note("bf16", (7, 5))  # a T4, as on Kaggle and Colab
    assert "only emulates (compute capability 7.5 < 8.0)" in note and "fp16" in note


def test_report_lines_and_markdown():
    ag = {"backbone": "phikon", "steps": 5, "patches": 64, "loss_max_abs": 1e-6,
          "fp32": compare_probs(probs(8, 0), probs(8, 0), gpu.TOL_FP32),
          "amp": {"max_abs": 0.012, "mean_abs": 0.002, "argmax_agree": 1.0, "tol": 0.05,
                  "ok": True}}
    line = gpu_report.format_agreement(ag)
    assert "\n" not in line and "fp32 max |dp| 0.00e+00 (tol 0.005: ok)" in line
    assert "AMP max |dp| 1.20e-02 (tol 0.05: ok)" in line
    tr = {"backbone": "phikon", "kit_ips": 510.0, "bare_ips": 540.0, "ratio": 1.06,
          "workers": 8}
    em = {"backbone": "phikon", "kit_ips": 900.0, "bare_ips": 1000.0, "ratio": 0.9,
          "bare_amp_ips": 2500.0, "kit_amp_ips": 2400.0}
    cv = {"backbone": "phikon", "seconds": 30.0, "oof_macro_f1": 0.5, "patches_per_s": 400.0,
          "peak_mem_gib": 3.25, "amp": "bf16", "channels_last": True, "num_workers": 8}
    assert "ratio 1.06x [8 loader workers]" in gpu_report.format_train(tr)
    assert "(0.90x of bare)" in gpu_report.format_embed(em)
    assert "features.amp auto   2400.0 patches/s" in gpu_report.format_embed(em)
    assert "peak 3.25 GiB" in gpu_report.format_cv(cv) and "amp bf16" in gpu_report.format_cv(cv)
    table = gpu_report.markdown({"device": "cuda:0", "name": "NVIDIA H200", "capability": "9.0",
                          "memory_gib": 139.8, "torch": "2.14.1", "cuda": "13.0", "amp": "bf16"},
                         {"cv": [cv], "train": [tr], "embed": [em], "agreement": [ag]})
    rows = table.splitlines()
    assert rows[0].startswith("GPU: NVIDIA H200 (capability 9.0, 139.8 GiB)")
    assert rows[-1] == ("| phikon | 400.0 | 3.25 | 510 / 540 (1.06x) | 900 / 1000 (0.90x) | "
                        "0.0e+00 / 1.2e-02 |")


# --------------------------------------------------------------------------- without CUDA
@without_cuda
def test_without_cuda_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "kit", "bench", "gpu"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: bench gpu: no CUDA device here (torch ")
    assert lines[0].endswith("run it on a GPU machine, e.g. a Kaggle or Colab GPU notebook "
                             "(!an2dl-kit bench gpu)")


def test_bad_device_and_skip_are_refused():
    with pytest.raises(KitError, match="use cuda, cuda:N or cpu"):
        gpu.require_device("mps")
    import argparse

    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--skip", "cv,speed"])
    args.seed = 0
    with pytest.raises(KitError, match="--skip speed: unknown step; steps: cv, agreement"):
        gpu.run(args)


# --------------------------------------------------------------------------- on the CPU
@pytest.mark.slow
def test_the_whole_bench_runs_on_the_cpu(tmp_path):
    """Every step on tiny backbones with --device cpu: the bench's own code, not GPU figures.
    CPU against CPU on the same seed must agree exactly."""
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "-m", "kit", "bench", "gpu", "--device", "cpu",
           "--backbones", "tiny_cnn,tiny_vit", "--images", "12", "--top-k", "2", "--size", "32",
           "--folds", "2", "--epochs", "1", "--patches", "32", "--batch-size", "8",
           "--repeats", "1", "--check-steps", "2", "--check-images", "4", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "these are not GPU figures" in proc.stdout
    data = json.loads(out.read_text())
    res = data["results"]
    assert [r["backbone"] for r in res["cv"]] == ["tiny_cnn", "tiny_vit"]
    for r in res["agreement"]:
        assert r["steps"] == 2 and r["fp32"]["max_abs"] == 0.0 and r["amp"]["max_abs"] == 0.0
    for part in ("train", "embed"):
        assert all(r["kit_ips"] > 0 and r["bare_ips"] > 0 for r in res[part])
    assert data["device"]["amp"] == "off"
    assert "| tiny_vit |" in proc.stdout


# --------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@needs_cuda
def test_cuda_short_bench_agrees_with_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "-m", "kit", "bench", "gpu", "--images", "24", "--top-k", "4",
           "--epochs", "1", "--patches", "256", "--repeats", "1", "--check-images", "4",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["device"]["amp"] in ("bf16", "fp16")
    for r in data["results"]["agreement"]:
        assert r["fp32"]["ok"] and r["amp"]["ok"], r
    for r in data["results"]["cv"]:
        assert r["channels_last"] and r["num_workers"] >= 0 and r["peak_mem_gib"] > 0


@pytest.mark.gpu
@needs_cuda
def test_cuda_amp_picks_a_native_precision():
    from kit.training.device import amp_dtype

    dev = torch.device("cuda")
    major, minor = torch.cuda.get_device_capability(dev)
    picked = {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype(dev, "auto")]
    assert precision_note(picked, (major, minor)) is None, (
        "kit.training.train.amp_dtype picks emulated bf16 on this GPU")
