"""./run.sh all: the plan, one run end to end to a validated submission and a ledger row, a
rerun that trains nothing, a resume after a kill during cv, and settings checked first."""
from __future__ import annotations

import pandas as pd
import pytest

from kit.cli import main
from kit.commands.all_plan import parse_runs
from kit.config import train_settings
from kit.data import demo
from kit.paths import Paths
from kit.training.cv import run_cv
from kit.utils import KitError

FROZEN = ["--weights", "tiny_cnn=random", "--set", "train_norm=[]", "--set", "epochs=3",
          "--patch-size", "32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo.generate(tmp_path_factory.mktemp("all") / "data", n_train=40, n_test=10,
                         short_side=96, seed=3)


def _all(data, work, *argv):
    return main(["all", *argv, "--data", str(data), "--workdir", str(work)])


def test_run_specs_and_per_run_settings():
    runs, common = parse_runs(["tiny_cnn", "probe=tiny_cnn"],
                              ["epochs=3", "probe:head.type=logreg"])
    assert [(r.name, r.backbone) for r in runs] == [("tiny_cnn", "tiny_cnn"),
                                                    ("probe", "tiny_cnn")]
    assert common == {"epochs": 3} and runs[1].sets == {"head": {"type": "logreg"}}
    with pytest.raises(KitError, match="no run named 'nope'"):
        parse_runs(["tiny_cnn"], ["nope:lr=1"])
    with pytest.raises(KitError, match="unknown backbone: 'tiny'"):
        parse_runs(["x=tiny"], [])


def test_a_bad_setting_stops_before_any_work(data, tmp_path, capsys):
    assert _all(data, tmp_path, "tiny_cnn", "p=tiny_cnn", "--set", "p:lr=abc") == 2
    assert "lr = 'abc' is not allowed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_all_end_to_end_then_nothing_to_redo(data, tmp_path, capsys):
    work = tmp_path / "w"
    assert _all(data, work, "tiny_cnn", *FROZEN, "--plan") == 0
    plan = capsys.readouterr().out
    assert "cv tiny_cnn" in plan and "estimated total" in plan
    assert not (work / "runs").exists()  # --plan does nothing
    paths = Paths.from_root(work)
    assert _all(data, work, "tiny_cnn", *FROZEN) == 0
    out = capsys.readouterr().out
    assert "[1/" in out and "blend" in out
    sub = pd.read_csv(paths.submissions_dir / "latest.csv")
    assert list(sub.columns) == ["sample_index", "label"] and len(sub) == 10
    ledger = pd.read_csv(paths.submissions_dir / "ledger.csv")
    assert len(ledger) == 1
    # Run again: every stage finds its work done, nothing retrains, no second submission.
    assert _all(data, work, "tiny_cnn", *FROZEN) == 0
    again = capsys.readouterr().out
    assert "clean: done earlier, skipped" in again and "blend: done earlier, skipped" in again
    assert "done earlier" in again and len(pd.read_csv(paths.submissions_dir / "ledger.csv")) == 1


def test_all_resumes_a_cv_killed_half_way(data, tmp_path, capsys):
    work = tmp_path / "w"
    paths = Paths.from_root(work)
    # The data stages, then one fold of cv: the state a kill during cv leaves behind.
    assert _all(data, work, "tiny_cnn", *FROZEN, "--plan") == 0
    assert main(["clean", "--data", str(data), "--workdir", str(work)]) == 0
    assert main(["patches", "--size", "32", "--data", str(data), "--workdir", str(work)]) == 0
    assert main(["folds", "--data", str(data), "--workdir", str(work)]) == 0
    settings = train_settings({"train_norm": [], "epochs": 3})
    partial = run_cv(paths, data, settings, backbone="tiny_cnn", weights="random", fold=0)
    assert partial["assembled"] is False
    capsys.readouterr()
    assert _all(data, work, "tiny_cnn", *FROZEN) == 0
    out = capsys.readouterr().out
    assert "tiny_cnn fold 0: done earlier" in out  # resumed, not retrained
    assert (paths.submissions_dir / "latest.csv").is_file()


def test_all_restart_retrains_folds_that_were_done(data, tmp_path, capsys):
    work = tmp_path / "w"
    assert _all(data, work, "tiny_cnn", *FROZEN) == 0
    capsys.readouterr()
    assert _all(data, work, "tiny_cnn", *FROZEN, "--restart") == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "fold 0: done earlier" not in text and "tiny_cnn fold 0:" in text
    assert "clean: done earlier, skipped" in out.out  # only cv restarts


@pytest.mark.slow  # two subprocesses, each tuning and training (~20 s)
def test_all_tunes_then_submits_once_and_records_the_public_score(data, tmp_path):
    # --tune N and --submit end to end: the real kaggle client against the fake server, in a
    # subprocess (the client fixes its endpoint at import time).
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fake_kaggle import FakeKaggle

    launcher = Path(__file__).with_name("fake_kaggle.py")
    work, home = tmp_path / "w", tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), HOME=str(home),
               NO_ALBUMENTATIONS_UPDATE="1", KAGGLE_USERNAME="kit-user", KAGGLE_KEY="k-123")

    def run(server):
        return subprocess.run(
            [sys.executable, str(launcher), server.url, "all", "tiny_cnn", *FROZEN, "--tune", "2",
             "--submit", "-m", "all: first", "--data", str(data), "--workdir", str(work)],
            env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)

    with FakeKaggle(username="kit-user", key="k-123", pending_polls=0, public_score="0.5",
                    lifetime_s=600) as server:
        first = run(server)
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
        assert "tune tiny_cnn" in first.stdout and "submit" in first.stdout
        paths = Paths.from_root(work)
        assert (paths.tune_dir("tiny_cnn") / "best.yaml").is_file()
        metrics = json.loads((paths.backbone_dir("tiny_cnn") / "metrics.json").read_text())
        assert "best.yaml" in str(metrics["config"]["params"])  # cv ran with the tuned params
        assert len(server.submissions) == 1
        assert list(server.uploads.values()) == [(paths.submissions_dir / "latest.csv")
                                                 .read_bytes()]
        ledger = pd.read_csv(paths.submissions_dir / "ledger.csv")
        assert len(ledger) == 1 and ledger.public_score.tolist() == [0.5]
        # Again: nothing retrains, the same file is not uploaded twice.
        again = run(server)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        assert "was uploaded already" in again.stdout and len(server.submissions) == 1
        assert "fold 0: done earlier" in again.stdout + again.stderr
