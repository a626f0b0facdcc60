"""./run.sh tune --workers N / --gpus LIST: one worker process per GPU sharing one storage,
run here on the CPU with two workers; a worker that dies stops the run with a clear error."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import yaml

from cv_data import make_workdir
from kit.tuning import workers as tune_workers
from kit.tuning.workers import Worker, assign, parse_gpus, run_processes, worker_env
from kit.utils import KitError

ROOT = Path(__file__).resolve().parents[1]


def env(**extra):
    clean = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return {**clean, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1", **extra}


# --------------------------------------------------------------------------- GPU assignment
def test_one_worker_per_listed_gpu_or_round_robin(monkeypatch):
    assert assign(None, ["0", "1"]) == ["0", "1"]
    assert assign(4, ["0", "1"]) == ["0", "1", "0", "1"]
    assert assign(1, ["3", "5"]) == ["3"]
    monkeypatch.setattr(tune_workers, "visible_gpus", lambda: [])
    assert assign(2, None) == [None, None]  # no GPU: CPU workers
    monkeypatch.setattr(tune_workers, "visible_gpus", lambda: ["2", "7"])
    assert assign(3, None) == ["2", "7", "2"]  # the visible GPUs, round-robin
    assert parse_gpus("all") == ["2", "7"]
    assert parse_gpus(" 0, 1 ") == ["0", "1"]
    with pytest.raises(KitError, match="--workers 0: give 1 or more"):
        assign(0, None)
    for bad in ("0,,1", "1,1", ","):
        with pytest.raises(KitError, match="give distinct GPU ids"):
            parse_gpus(bad)
    monkeypatch.setattr(tune_workers, "visible_gpus", lambda: [])
    with pytest.raises(KitError, match="no CUDA GPU is visible here; use --workers N"):
        parse_gpus("all")


def test_visible_gpus_respects_an_existing_restriction(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert tune_workers.visible_gpus() == ["4", "6"]  # not 0,1: those would be renumbered
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert tune_workers.visible_gpus() == ["0", "1"]


def test_worker_environment(monkeypatch):
    assert worker_env("1", 2) == {"CUDA_VISIBLE_DEVICES": "1"}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert worker_env(None, 2) == {"OMP_NUM_THREADS": "4"}  # CPU workers share the cores
    assert worker_env(None, 16) == {"OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_env(None, 2) == {}  # the user's choice wins


# --------------------------------------------------------------------------- supervision
def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_output_is_prefixed_per_worker():
    out = io.StringIO()
    run_processes([Worker("w0 gpu0", py("print('hello'); print('bye')")),
                   Worker("w1 gpu1", py("import os, sys; print(os.environ['X'], file=sys.stderr)"),
                          {"X": "from w1"})], out=out)
    lines = out.getvalue().splitlines()
    assert sorted(lines) == ["[w0 gpu0] bye", "[w0 gpu0] hello", "[w1 gpu1] from w1"]
    assert lines.index("[w0 gpu0] hello") < lines.index("[w0 gpu0] bye")


def test_a_failing_worker_stops_the_others_and_is_named():
    out = io.StringIO()
    t0 = time.perf_counter()
    with pytest.raises(KitError, match="worker w1 cpu exited with code 3") as info:
        run_processes([Worker("w0 cpu", py("import time; print('working', flush=True); "
                                           "time.sleep(60)")),
                       Worker("w1 cpu", py("import sys, time; time.sleep(0.5); "
                                           "print('boom', flush=True); sys.exit(3)"))], out=out)
    assert time.perf_counter() - t0 < 30  # the sleeping worker was stopped, not waited for
    assert str(info.value).startswith("tune: worker w1 cpu exited with code 3 (its last lines "
                                      "above, prefixed [w1 cpu]); the others were stopped")
    text = out.getvalue()
    assert "[w1 cpu] boom" in text and "[w0 cpu] working" in text
    assert "tune: worker w1 cpu exited with code 3; stopping the other 1" in text


def test_a_killed_worker_is_reported_as_killed():
    with pytest.raises(KitError, match=r"worker w0 cpu was killed by SIGKILL \(killed: out of "
                                       r"memory\?\)"):
        run_processes([Worker("w0 cpu", py("import os, signal; "
                                           "os.kill(os.getpid(), signal.SIGKILL)"))],
                      out=io.StringIO())


def test_launcher_refuses_estimate_and_create_only():
    from kit.config import load_config, train_settings
    from kit.paths import Paths
    from kit.tuning.job import TuneJob

    job = TuneJob(Paths.from_root("."), None, load_config("tune"), train_settings())
    with pytest.raises(KitError, match="--estimate runs in one process"):
        tune_workers.launch(replace(job, estimate=True), 2, None)
    with pytest.raises(KitError, match="--create-only creates the studies once"):
        tune_workers.launch(replace(job, create_only=True), 2, None)


def test_a_worker_gets_the_job_the_launcher_resolved(tmp_path):
    from kit.config import load_config, train_settings
    from kit.paths import Paths
    from kit.tuning.job import TuneJob

    job = TuneJob(Paths.from_root(tmp_path), "data", load_config("tune", {"trials": 3}),
                  train_settings({"epochs": 2}), backbones=("tiny_cnn",), space_file=tmp_path,
                  weights="random", seed=7)
    again = TuneJob.from_json(tune_workers._payload(job, "sqlite:///x.db", create_only=True))
    assert again == replace(job, cfg={**job.cfg, "storage": "sqlite:///x.db"},
                            space_file=str(tmp_path), create_only=True)
    assert again.settings.resolve()["epochs"] == 2


def test_a_worker_reads_the_launchers_task(tmp_path):
    """The task travels in the payload: a worker scores by --task's metric even though the
    data folder holds no task.yaml (nor the same one)."""
    from kit.config import load_config, train_settings
    from kit.paths import Paths
    from kit.task import Data, load_task, task_of
    from kit.tuning.job import TuneJob

    task = load_task("imagefolder")
    job = TuneJob(Paths.from_root(tmp_path), Data(tmp_path / "data", task), load_config("tune"),
                  train_settings({"epochs": 2}), backbones=("tiny_cnn",))
    again = TuneJob.from_json(tune_workers._payload(job, "sqlite:///x.db"))
    assert again.data == job.data and task_of(again.data).metric == task.metric
    assert again.data.task.builtin and again.data.task.source == task.source
    assert again.trial_settings().resolve({"epochs": 5})["epochs"] == 5  # params win there
    assert again.settings.resolve({"epochs": 5})["epochs"] == 2  # as cv's overrides do


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_two_cpu_workers_share_one_study(tmp_path):
    paths = make_workdir(tmp_path / "w", n_train=24, n_test=4, k=2, size=32, n_folds=3)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"default": {
        "head.depth": {"type": "int", "low": 0, "high": 1}, "head.width": None,
        "head.dropout": None, "head.activation": None, "weight_decay": None,
        "class_balance": None, "augment.cutmix_alpha": None, "epochs": 4,
        "lr": {"type": "float", "low": 0.001, "high": 0.02}}}))
    cmd = [sys.executable, "-m", "kit", "tune", "tiny_cnn", "--workdir", str(paths.root),
           "--weights", "random", "--space", str(space), "--trials", "4", "--workers", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == "tune: 2 workers on one storage (w0: CPU, w1: CPU)"
    assert any(line.startswith("[create") and "study tiny_cnn-features" in line for line in out)
    for label in ("[w0 cpu]", "[w1 cpu]"):
        assert any(line.startswith(label) for line in out), label
    assert out[-1].startswith("tune: 2 workers done in ")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="tiny_cnn-features",
                              storage=f"sqlite:///{paths.runs_dir / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4  # --trials counts over both workers
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both did work
    # Distinct sampler seeds: two workers starting together must not draw the same trials.
    firsts = [t.params for t in sorted(trials, key=lambda t: t.number)[:2]]
    assert firsts[0] != firsts[1]
    best = yaml.safe_load((paths.tune_dir("tiny_cnn") / "best.yaml").read_text())
    assert best["trial"] == study.best_trial.number


def test_a_worker_that_cannot_start_fails_clearly(tmp_path):
    paths = make_workdir(tmp_path / "w", n_train=8, n_test=2, k=1, size=32, n_folds=2)
    cmd = [sys.executable, "-m", "kit", "tune", "tiny_cnn", "--workdir", str(paths.root),
           "--weights", "random", "--trials", "2", "--gpus", "0,1", "--device", "cuda"]
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (--device cuda must fail in the workers)")
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "[create] error: device 'cuda' is not available here" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: tune: worker create exited with code 2")
