"""./run.sh tune: search spaces, objectives equal to cv's score, pruning, resume after a killed
worker, storages (SQLite, journal, a real PostgreSQL with two workers) and best.yaml."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from cv_data import make_workdir
from kit.config import load_config, train_settings
from kit.training.feature_cv import features_cv, prepare
from kit.tuning.outputs import plot_study
from kit.tuning.search_space import Param, known_param_keys, load_space, parse_param
from kit.tuning.storage import describe, make_storage
from kit.tuning.study import fold_subset, study_name, trial_order, warm_start
from kit.tuning.tune import run_tune
from kit.utils import KitError

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("KIT_TEST_POSTGRES_URL",
                        "postgresql+psycopg2://kit:kit@127.0.0.1:55432/kit_optuna")
SPACE = load_config("tune")["space"]
# Every parameter of the shipped default space, removed (a test then adds its own).
NULLS = {k: None for k in SPACE["default"] if k != "lr"}


def space_file(tmp_path, name="space.yaml", **default):
    """A --space file: the default space with everything removed except ``default``."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"default": {**NULLS, **default}}))
    return path


LR = {"type": "float", "low": 0.0, "high": 0.02}
FAST = dict(lr=LR, epochs=12, patience=0)


def trials_of(paths, name, storage=None):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or f"sqlite:///{paths.runs_dir / 'optuna.db'}"
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def kit_cmd(*args):
    return [sys.executable, "-m", "kit", "tune", *map(str, args)]


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}


# --------------------------------------------------------------------------- search space
def test_default_space_parses_for_every_backbone_and_objective():
    from kit.models.backbones import list_backbones

    keys = known_param_keys(train_settings())
    for bb in list_backbones():
        full = load_space(bb, "full", SPACE, known_keys=keys)
        feats = load_space(bb, "features", SPACE, known_keys=keys)
        for name in ("head.depth", "head.dropout", "augment.cutmix_alpha", "lr",
                     "weight_decay", "class_balance", "epochs", "head.width",
                     "head.activation"):
            assert name in full.searched
        # CutMix does not exist in feature space.
        assert "augment.cutmix_alpha" not in feats.params
        assert full.searched["head.depth"].low == 0 and full.searched["head.depth"].high == 4
        assert full.searched["augment.cutmix_alpha"].contains(0.0)  # 0 = off is searchable


def test_user_space_overrides_ranges_removes_and_fixes(tmp_path):
    user = tmp_path / "space.yaml"
    user.write_text(yaml.safe_dump({
        "default": {"head.depth": {"type": "int", "low": 1, "high": 2}, "weight_decay": None,
                    "head.norm": "layernorm"},
        "phikon": {"lr": {"type": "float", "low": 1e-5, "high": 1e-4, "log": True}},
    }))
    sp = load_space("phikon", "features", SPACE, user,
                    known_keys=known_param_keys(train_settings()))
    assert (sp.searched["head.depth"].low, sp.searched["head.depth"].high) == (1, 2)
    assert "weight_decay" not in sp.params
    assert sp.fixed == {"head.norm": "layernorm"}
    assert sp.searched["lr"].high == 1e-4 and sp.searched["lr"].log
    other = load_space("tiny_cnn", "features", SPACE, user)
    assert other.searched["lr"].high == 3e-3  # the phikon entry applies to phikon only
    trial = optuna.trial.FixedTrial({"head.depth": 2, "head.width": 128, "head.dropout": 0.1,
                                     "head.activation": "gelu", "head.pool": "attention",
                                     "lr": 5e-5, "class_balance": "loss", "epochs": 20,
                                     "head.type": "mlp", "label_issues.mode": "off"})
    params = sp.suggest(trial)
    assert params["head.depth"] == 2 and params["head.norm"] == "layernorm"
    assert params["lr"] == 5e-5


def test_the_conf_space_of_a_backbone_merges_over_default():
    sp = load_space("phikon", "features", SPACE)
    assert sp.searched["lr"].high == 1e-3 and sp.searched["lr"].low == 3e-5
    assert "head.depth" in sp.searched


@pytest.mark.parametrize("spec, match", [
    ({"type": "normal", "low": 0, "high": 1}, "type must be one of"),
    ({"type": "float", "low": 1, "high": 0}, "low <= high"),
    ({"type": "float", "low": 0, "high": 1, "log": True}, "log scale needs low > 0"),
    ({"type": "int", "low": 0.5, "high": 3}, "integer"),
    ({"type": "categorical", "choices": []}, "non-empty list"),
    ({"type": "float", "low": 0}, "needs `low` and `high`"),
    ({"type": "float", "low": 0, "high": 1, "objectives": ["cv"]}, "objectives"),
    ({"type": "float", "low": 0, "high": 1, "stepp": 1}, "unknown field"),
])
def test_bad_parameter_specs_are_refused(spec, match):
    with pytest.raises(KitError, match=match):
        parse_param("lr", spec, "my.yaml")


def test_unknown_parameter_names_and_shapes_are_refused(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump({"default": {"head.dept": {"type": "int", "low": 0, "high": 2}}}))
    with pytest.raises(KitError, match=r"typo.yaml: unknown parameter\(s\) head.dept"):
        load_space("tiny_cnn", "features", SPACE, bad,
                   known_keys=known_param_keys(train_settings()))
    flat = tmp_path / "flat.yaml"
    flat.write_text("lr: 0.1\n")
    with pytest.raises(KitError, match="default:"):
        load_space("tiny_cnn", "features", SPACE, flat)
    empty = space_file(tmp_path, "none.yaml", lr=None)
    with pytest.raises(KitError, match="nothing to search"):
        load_space("tiny_cnn", "features", SPACE, empty)


def test_param_domains():
    p = Param("x", "int", 0, 4)
    assert p.contains(3) and not p.contains(5) and not p.contains(1.5)
    assert Param("c", "categorical", choices=("a", "b")).contains("a")


def test_names_fold_subsets_and_orders():
    assert study_name("phikon", "features") == "phikon-features"
    assert study_name("phikon", "full", "v2") == "phikon-full-v2"
    assert fold_subset(5, 0, 1) == [0, 1, 2, 3, 4] == fold_subset(5, 5, 1)
    sub = fold_subset(5, 3, 1)
    assert len(sub) == 3 and sub == fold_subset(5, 3, 1)  # fixed for a study
    with pytest.raises(KitError, match="at least 2"):
        fold_subset(5, 1, 0)
    orders = {tuple(trial_order(sub, 42, n)) for n in range(20)}
    assert all(sorted(o) == sub for o in orders) and len(orders) > 1  # shuffled per trial


# --------------------------------------------------------------------------- storage
def test_storages(tmp_path):
    from optuna.storages import JournalStorage, RDBStorage

    paths = make_workdir(tmp_path / "w", n_train=8, n_test=2, k=1, size=32, n_folds=2)
    sql = make_storage(None, paths, heartbeat_interval=5, grace_period=10)
    assert isinstance(sql, RDBStorage) and sql.heartbeat_interval == 5
    assert (paths.runs_dir / "optuna.db").exists()
    assert isinstance(make_storage(f"journal:{tmp_path}/j/tune.log", paths), JournalStorage)
    assert isinstance(make_storage(str(tmp_path / "other.log"), paths), JournalStorage)
    with pytest.raises(KitError, match="not an RDB URL"):
        make_storage("runs/optuna.db", paths)
    assert describe("postgresql+psycopg2://kit:secret@host:5432/db") == \
        "postgresql+psycopg2://kit:***@host:5432/db"


# --------------------------------------------------------------------------- objectives
@pytest.fixture(scope="module")
def feat_work(tmp_path_factory):
    paths = make_workdir(tmp_path_factory.mktemp("tune_feat"), n_train=40, n_test=4, k=4,
                         size=32, n_folds=5, seed=0)
    # warm the cache
    prepare("tiny_cnn", paths, weights="random", seed=42, with_test=False,
            settings=train_settings())
    return paths


def test_features_objective_equals_features_cv_and_writes_outputs(feat_work, tmp_path):
    paths = feat_work
    space = space_file(tmp_path, **FAST, **{"head.depth": {"type": "int", "low": 0, "high": 1}})
    best = run_tune(paths, None, load_config("tune", {"objective": "features", "trials": 2}),
                    settings=train_settings(), backbones=["tiny_cnn"], space_file=space,
                    weights="random", seed=42, study_suffix="eq")["tiny_cnn"]
    out = paths.tune_dir("tiny_cnn")
    on_disk = yaml.safe_load((out / "best.yaml").read_text())
    assert on_disk["params"] == best["params"] and on_disk["trial"] == best["trial"]
    assert on_disk["objective"] == "features" and on_disk["study"] == "tiny_cnn-features-eq"
    assert set(on_disk["params"]) == {"lr", "head.depth", "epochs", "patience"}
    complete = [t for t in trials_of(paths, "tiny_cnn-features-eq") if t.state.name == "COMPLETE"]
    for t in trials_of(paths, "tiny_cnn-features-eq"):
        res = features_cv("tiny_cnn", paths, params=t.user_attrs["params"], seed=42,
                          weights="random", with_test=False, settings=train_settings())
        if t.state.name == "COMPLETE":
            assert t.value == pytest.approx(res.oof_macro_f1, abs=1e-12)
        per_fold = {r["fold"]: r["macro_f1"] for r in res.per_fold}
        assert t.intermediate_values == pytest.approx(
            {k: per_fold[k] for k in t.intermediate_values})
    assert on_disk["score"] == max(t.value for t in complete)
    # cv's params loader reads it as dotted overrides the training config accepts.
    from kit.training.cv import resolve_params
    from kit.training.settings import train_config

    # On the path the search trained (heads on cached embeddings) every key applies...
    params, _ = resolve_params("best", paths, "tiny_cnn",
                               settings=train_settings({"train_norm": []}))
    assert params == on_disk["params"] and train_config(train_settings(),
                                                        params=params)["epochs"] == 12
    # ... on pixels only the head's shape: lr, epochs and patience were tuned for the cache.
    params, _ = resolve_params("best", paths, "tiny_cnn", settings=train_settings())
    assert params == {"head.depth": on_disk["params"]["head.depth"]}
    # best.yaml says what its score is and what it was tuned for.
    assert on_disk["search_score"] == on_disk["score"] and on_disk["trials"] == 2
    assert on_disk["search_score_kind"].startswith("search: best of 2 trials on all 5 folds")
    assert "optimistic" in on_disk["search_score_kind"] and "holdout_score" not in on_disk
    assert on_disk["training_path"] == "feature_cache"
    assert on_disk["early_stopping"] == train_config(train_settings())["early_stopping"]
    from kit.data.folds import folds_hash

    assert on_disk["folds_sha256"] == folds_hash(paths) and on_disk["weights"] == "random"
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 2 and {"number", "value", "state", "params_lr"} <= set(table.columns)
    assert (out / "history.png").stat().st_size > 0 and (out / "config.yaml").exists()
    # A rerun with the same target starts no trial.
    run_tune(paths, None, load_config("tune", {"trials": 2}), settings=train_settings(),
             backbones=["tiny_cnn"], space_file=space, weights="random", study_suffix="eq")
    assert len(trials_of(paths, "tiny_cnn-features-eq")) == 2


def test_plots_are_skipped_with_too_few_trials(tmp_path):
    study = optuna.create_study(direction="maximize")
    assert len(plot_study(study, tmp_path)) == 2 and not list(tmp_path.glob("*.png"))
    study.add_trial(optuna.trial.create_trial(params={"x": 1.0}, value=0.5, distributions={
        "x": optuna.distributions.FloatDistribution(0, 2)}))
    notes = plot_study(study, tmp_path)
    assert (tmp_path / "history.png").exists() and "importances.png: needs 2" in notes[0]


def test_folds_per_trial_searches_a_subset_and_rescores_the_best(feat_work, tmp_path):
    space = space_file(tmp_path, **FAST)
    rec = run_tune(feat_work, None, load_config("tune", {"trials": 2, "folds_per_trial": 3}),
                   settings=train_settings(), backbones=["tiny_cnn"], space_file=space,
                   weights="random", study_suffix="sub")["tiny_cnn"]
    sub = fold_subset(5, 3, 42)
    for t in trials_of(feat_work, "tiny_cnn-features-sub"):
        assert sorted(t.intermediate_values) == sub
    full = features_cv("tiny_cnn", feat_work, params=rec["params"], seed=42, weights="random",
                       with_test=False, settings=train_settings())
    part = features_cv("tiny_cnn", feat_work, params=rec["params"], seed=42, weights="random",
                       with_test=False, folds=sub, settings=train_settings())
    assert rec["score"] == pytest.approx(full.oof_macro_f1)
    assert rec["search_score"] == pytest.approx(part.oof_macro_f1)
    assert rec["search_folds"] == sub
    # The folds the search never used score the winner less optimistically.
    unused = [k for k in range(5) if k not in sub]
    held = features_cv("tiny_cnn", feat_work, params=rec["params"], seed=42, weights="random",
                       with_test=False, folds=unused, settings=train_settings())
    assert rec["holdout_folds"] == unused
    assert rec["holdout_score"] == pytest.approx(held.oof_macro_f1)
    assert "less biased" in rec["holdout_kind"] and "partly optimistic" in rec["score_kind"]
    assert f"folds {','.join(map(str, sub))}" in rec["search_score_kind"]
    assert rec["per_fold"] == pytest.approx({r["fold"]: r["macro_f1"] for r in full.per_fold})


def test_wilcoxon_prunes_a_hopeless_trial(feat_work, tmp_path):
    space = space_file(tmp_path, **FAST)
    kw = dict(space_file=space, weights="random", study_suffix="prune")
    run_tune(feat_work, None, load_config("tune"), settings=train_settings(),
             backbones=["tiny_cnn"], create_only=True, **kw)
    study = optuna.load_study(study_name="tiny_cnn-features-prune",
                              storage=f"sqlite:///{feat_work.runs_dir / 'optuna.db'}")
    for lr in (0.01, 0.012, 0.0):  # two good trials, then lr = 0: the head never learns
        study.enqueue_trial({"lr": lr})
    run_tune(feat_work, None, load_config("tune", {"trials": 3}), settings=train_settings(),
             backbones=["tiny_cnn"], **kw)
    good1, good2, bad = trials_of(feat_work, "tiny_cnn-features-prune")
    assert good1.state.name == good2.state.name == "COMPLETE"
    assert min(good1.intermediate_values.values()) > 0.5
    assert bad.params["lr"] == 0.0 and bad.state.name == "PRUNED"
    # Stopped before the last fold: 4 paired folds all worse give p = 1/16 < 0.1.
    assert len(bad.intermediate_values) == 4


def test_warm_start_enqueues_the_best_features_trials(feat_work, tmp_path):
    storage = optuna.storages.InMemoryStorage()
    src = optuna.create_study(direction="maximize", storage=storage, study_name="src")
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True),
            "head.depth": optuna.distributions.IntDistribution(0, 4)}
    for v, lr, depth in ((0.3, 1e-3, 1), (0.5, 2e-3, 2), (0.4, 5e-4, 3), (0.9, 0.5, 1)):
        src.add_trial(optuna.trial.create_trial(
            params={"lr": lr, "head.depth": depth}, distributions=dist, value=v,
            user_attrs={"params": {"lr": lr, "head.depth": depth, "patience": 3}}))
    dst = optuna.create_study(direction="maximize", storage=storage, study_name="dst")
    full = load_space("tiny_cnn", "full", SPACE)
    assert warm_start(dst, src, full, top=3) == 3
    waiting = dst.get_trials(states=(optuna.trial.TrialState.WAITING,))
    # Best first; lr 0.5 lies outside the full space, so only its depth is carried over.
    queued = [t.system_attrs["fixed_params"] for t in waiting]
    assert queued == [{"head.depth": 1}, {"lr": 2e-3, "head.depth": 2},
                      {"lr": 5e-4, "head.depth": 3}]
    assert waiting[1].user_attrs["warm_start"] == "src#1"


def test_a_changed_folds_file_is_not_mixed_into_a_study(tmp_path):
    paths = make_workdir(tmp_path / "w", n_train=16, n_test=2, k=2, size=32, n_folds=2)
    space = space_file(tmp_path, lr=LR, epochs=2)
    run_tune(paths, None, load_config("tune"), settings=train_settings(), backbones=["tiny_cnn"],
             create_only=True, space_file=space, weights="random")
    folds = pd.read_csv(paths.folds_csv)
    folds["fold"] = 1 - folds["fold"]
    folds.to_csv(paths.folds_csv, index=False)
    with pytest.raises(KitError, match="made with other folds"):
        run_tune(paths, None, load_config("tune", {"trials": 1}), settings=train_settings(),
                 backbones=["tiny_cnn"], space_file=space, weights="random")


def test_full_objective_equals_cv_and_cv_consumes_best_yaml(tmp_path):
    from kit.training.cv import run_cv

    paths = make_workdir(tmp_path / "w", n_train=24, n_test=4, k=2, size=32, n_folds=3)
    space = space_file(tmp_path, lr={"type": "float", "low": 0.005, "high": 0.02}, epochs=2,
                       patience=0, **{"augment.cutmix_alpha": {
                           "type": "categorical", "choices": [0.0, 0.5],
                           "objectives": ["full"]}, "head.depth": 0})
    rec = run_tune(paths, None, load_config("tune", {"objective": "full", "trials": 1}),
                   settings=train_settings(), backbones=["tiny_cnn"], space_file=space,
                   weights="random", seed=3)["tiny_cnn"]
    assert rec["objective"] == "full" and "augment.cutmix_alpha" in rec["params"]
    assert not paths.backbone_dir("tiny_cnn").exists()  # trials never touch runs/<bb>/
    assert not (paths.tune_dir("tiny_cnn") / "trials").exists() or \
        not any((paths.tune_dir("tiny_cnn") / "trials").iterdir())  # scratch removed
    metrics = run_cv(paths, None, train_settings(), backbone="tiny_cnn", params="best", seed=3,
                     weights="random")
    assert metrics["oof_macro_f1"] == pytest.approx(rec["score"], abs=1e-12)
    assert "best.yaml" in metrics["config"]["params"]
    per_fold = {f["fold"]: f["macro_f1"] for f in metrics["per_fold"]}
    assert per_fold == pytest.approx(rec["per_fold"])


# --------------------------------------------------------------------------- workers
def _wait_for_running(paths, name, proc, url=None, limit=120):
    t0 = time.time()
    while time.time() - t0 < limit:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            # Running with its parameters drawn: the kill then lands inside the folds.
            running = [t for t in trials_of(paths, name, url)
                       if t.state.name == "RUNNING" and t.params]
        except KeyError:  # the study is not created yet
            running = []
        if running:
            return running[0]
        time.sleep(0.2)
    raise AssertionError("no trial started in time")


@pytest.mark.slow
def test_resume_after_a_killed_worker_retries_its_trial(feat_work, tmp_path):
    space = space_file(tmp_path, lr={"type": "float", "low": 0.005, "high": 0.02},
                       epochs=80, patience=0)  # a trial of a second or two
    cmd = kit_cmd("tiny_cnn", "--workdir", feat_work.root, "--weights", "random", "--trials", 1,
                  "--heartbeat", 1, "--grace", 3, "--space", space, "--study-suffix", "kill")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        victim = _wait_for_running(feat_work, "tiny_cnn-features-kill", proc)
        proc.send_signal(signal.SIGKILL)  # kill -9 mid-trial: no chance to clean up
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert trials_of(feat_work, "tiny_cnn-features-kill")[victim.number].state.name == "RUNNING"
    # Rerun at once: the new worker waits until the dead trial's heartbeat is older than the
    # grace period, then it is failed and re-queued, and this worker runs it.
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    trials = trials_of(feat_work, "tiny_cnn-features-kill")
    assert trials[victim.number].state.name == "FAIL"
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    assert retried[0].params == victim.params
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 1


def _postgres_reachable(url: str) -> str | None:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # any failure to connect means "no server" here
        return str(exc).strip().splitlines()[0]


@pytest.mark.postgres
def test_two_workers_share_one_study_on_postgresql(feat_work, tmp_path):
    why = _postgres_reachable(PG_URL)
    if why is not None:
        msg = (f"no PostgreSQL at {describe(PG_URL)} ({why}); start one with "
               "bash .ci/start-postgres.sh or set KIT_TEST_POSTGRES_URL")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must provide PostgreSQL: {msg}")
        pytest.skip(msg)
    suffix = f"pg{uuid.uuid4().hex[:8]}"
    name = f"tiny_cnn-features-{suffix}"
    space = space_file(tmp_path, lr={"type": "float", "low": 0.005, "high": 0.02}, epochs=30,
                       patience=0)
    args = ["tiny_cnn", "--workdir", feat_work.root, "--weights", "random", "--storage", PG_URL,
            "--space", space, "--study-suffix", suffix]
    try:
        # The study (and Optuna's tables) first, so the workers do not race to create them:
        # what `./run.sh tune ... --create-only` does, here without one more process start.
        run_tune(feat_work, None, load_config("tune", {"storage": PG_URL}),
                 settings=train_settings(), backbones=["tiny_cnn"], space_file=space,
                 weights="random", study_suffix=suffix, create_only=True)
        workers = [subprocess.Popen(kit_cmd(*args, "--trials", 6), cwd=ROOT, env=env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for _ in range(2)]
        outs = [w.communicate(timeout=300)[0] for w in workers]
        assert all(w.returncode == 0 for w in workers), outs
        trials = trials_of(feat_work, name, PG_URL)
        numbers = [t.number for t in trials]
        assert len(numbers) == len(set(numbers))
        finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
        assert len(finished) == 6
        assert len({t.user_attrs["worker"] for t in finished}) == 2  # both did work
        from kit.training.cv import resolve_params

        best = yaml.safe_load((feat_work.tune_dir("tiny_cnn") / "best.yaml").read_text())
        params, _ = resolve_params("best", feat_work, "tiny_cnn",
                                   settings=train_settings({"train_norm": []}))
        assert best["study"] == name and params == best["params"]
        study = optuna.load_study(study_name=name, storage=PG_URL)
        assert study.best_trial.number == best["trial"]
        assert best["storage"] == describe(PG_URL) and "kit:kit@" not in best["storage"]
    finally:
        try:
            optuna.delete_study(study_name=name, storage=PG_URL)
        except KeyError:
            pass


def test_without_names_it_tunes_the_backbones_cv_ran(tmp_path, capsys):
    paths = make_workdir(tmp_path / "w", n_train=8, n_test=2, k=1, size=32, n_folds=2)
    with pytest.raises(KitError, match="name the backbones"):
        run_tune(paths, None, load_config("tune"), settings=train_settings(), backbones=[],
                 create_only=True, weights="random")
    paths.backbone_dir("tiny_cnn").mkdir(parents=True)
    (paths.backbone_dir("tiny_cnn") / "metrics.json").write_text("{}")
    run_tune(paths, None, load_config("tune"), settings=train_settings(), backbones=[],
             create_only=True, weights="random")
    assert "study tiny_cnn-features" in capsys.readouterr().out
    with pytest.raises(KitError, match="unknown backbone"):
        run_tune(paths, None, load_config("tune"), settings=train_settings(),
                 backbones=["tiny_cnnn"], create_only=True)


def test_bench_tune_runs_and_records_both_trials(tmp_path):
    import json

    from kit.cli import main

    rc = main(["bench", "tune", "--images", "40", "--test-images", "4", "--dim", "16",
               "--backbones", "tiny_cnn", "--subset", "4", "--size", "32",
               "--workdir", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "runs" / "bench" / "tune.json").read_text())
    assert len(result["features_trial"]["epochs_per_fold"]) == 5
    tiny = result["full"]["tiny_cnn"]
    assert {"extrapolated_seconds", "ratio"} <= set(tiny) and len(tiny["how"]) == 5


def test_ctrl_c_loses_only_the_running_trial(feat_work, tmp_path, monkeypatch):
    from kit.training.feature_cv import FeatureCV

    space = space_file(tmp_path, **FAST)
    kw = dict(space_file=space, weights="random", study_suffix="ctrlc")
    calls, real = {"n": 0}, FeatureCV.fold

    def interrupted_later(self, k, with_test=False):
        calls["n"] += 1
        if calls["n"] == 7:  # trial 0 runs its 5 folds; Ctrl-C inside trial 1
            raise KeyboardInterrupt
        return real(self, k, with_test)

    monkeypatch.setattr(FeatureCV, "fold", interrupted_later)
    with pytest.raises(KeyboardInterrupt):
        run_tune(feat_work, None, load_config("tune", {"trials": 3}), settings=train_settings(),
                 backbones=["tiny_cnn"], **kw)
    states = [t.state.name for t in trials_of(feat_work, "tiny_cnn-features-ctrlc")]
    assert states == ["COMPLETE", "FAIL"]
    best = yaml.safe_load((feat_work.tune_dir("tiny_cnn") / "best.yaml").read_text())
    assert best["study"] == "tiny_cnn-features-ctrlc" and best["trial"] == 0  # still written
    monkeypatch.setattr(FeatureCV, "fold", real)
    run_tune(feat_work, None, load_config("tune", {"trials": 3}), settings=train_settings(),
             backbones=["tiny_cnn"], **kw)  # the rerun finishes the target
    states = [t.state.name for t in trials_of(feat_work, "tiny_cnn-features-ctrlc")]
    assert states[:2] == ["COMPLETE", "FAIL"] and len(states) == 4
    assert sum(s in ("COMPLETE", "PRUNED") for s in states) == 3


def test_journal_storage_threads_and_timeout(feat_work, tmp_path):
    space = space_file(tmp_path, **FAST)
    journal = tmp_path / "tune.log"
    run_tune(feat_work, None,
             load_config("tune", {"trials": 4, "n_jobs": 2, "storage": f"journal:{journal}"}),
             settings=train_settings(), backbones=["tiny_cnn"], space_file=space, weights="random",
             study_suffix="journal")
    study = optuna.load_study(study_name="tiny_cnn-features-journal",
                              storage=make_storage(f"journal:{journal}", feat_work))
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4 and len({t.number for t in study.trials}) == len(study.trials)
    t0 = time.time()
    run_tune(feat_work, None,
             load_config("tune", {"trials": 0, "timeout": 1, "storage": f"journal:{journal}"}),
             settings=train_settings(), backbones=["tiny_cnn"], space_file=space, weights="random",
             study_suffix="journal")
    assert len(study.trials) > len(finished) and time.time() - t0 < 60


def test_one_worker_on_the_default_storage_repeats_its_search(feat_work, tmp_path):
    space = space_file(tmp_path, **FAST, **{"head.depth": {"type": "int", "low": 0, "high": 2}})
    for suffix in ("det1", "det2"):
        run_tune(feat_work, None, load_config("tune", {"trials": 2}), settings=train_settings(),
                 backbones=["tiny_cnn"], space_file=space, weights="random", study_suffix=suffix)
    a, b = (trials_of(feat_work, f"tiny_cnn-features-{s}") for s in ("det1", "det2"))
    assert [t.params for t in a] == [t.params for t in b]
    assert [t.value for t in a] == [t.value for t in b]


# --------------------------------------------------------------------------- nested estimate
def test_estimate_is_nested_and_its_outer_folds_never_choose_their_params(tmp_path, monkeypatch,
                                                                          capsys):
    import json

    from kit.cli import main
    from kit.metrics import format_ci
    from kit.training.feature_cv import FeatureCV

    paths = make_workdir(tmp_path / "w", n_train=24, n_test=2, k=2, size=32, n_folds=3, seed=1,
                         signal=0.3)
    space = space_file(tmp_path, lr={"type": "float", "low": 0.0, "high": 0.02}, epochs=4,
                       patience=0)
    calls, real = [], FeatureCV.fold

    def spy(self, k, with_test=False, exclude=()):
        calls.append((int(k), tuple(sorted(int(e) for e in exclude))))
        return real(self, k, with_test=with_test, exclude=exclude)

    monkeypatch.setattr(FeatureCV, "fold", spy)
    # Through the CLI: --estimate-trials takes a value as small as 2.
    assert main(["tune", "tiny_cnn", "--estimate", "--estimate-trials", "2", "--space",
                 str(space), "--weights", "random", "--workdir", str(paths.root)]) == 0
    out = capsys.readouterr().out
    on_disk = json.loads((paths.tune_dir("tiny_cnn") / "estimate.json").read_text())
    assert [o["fold"] for o in on_disk["outer"]] == [0, 1, 2]
    # The estimate carries its bootstrap interval over the outer folds' images, printed beside.
    lo, hi = on_disk["estimate_ci95"]
    assert lo <= on_disk["macro_f1"] <= hi and lo < hi
    assert on_disk["n_images"] == sum(o["n"] for o in on_disk["outer"])
    assert (f"nested macro F1 estimate {format_ci(on_disk['macro_f1'], [lo, hi])} (95% "
            f"bootstrap interval over {on_disk['n_images']} images") in out
    assert on_disk["trials_per_outer_fold"] == 2 and on_disk["objective"] == "features"
    assert on_disk["honest"] is True and "nested" in on_disk["kind"]
    assert not trials_of_any(paths)  # the estimate touches no study
    # Each outer fold: a search whose every fold trains and scores without it, then the
    # winner trained on all other folds (plain cv fold o) scores it.
    segments, current = [], []
    for k, exclude in calls:
        current.append((k, exclude))
        if not exclude:
            segments.append(current)
            current = []
    assert len(segments) == 3 and not current
    for o, segment in enumerate(segments):
        *search, final = segment
        assert final == (o, ()) and search
        assert all(k != o and exclude == (o,) for k, exclude in search)
        assert {k for k, _ in search} == {k for k in range(3) if k != o}
        outer = on_disk["outer"][o]
        assert outer["inner_folds"] == [k for k in range(3) if k != o]
        again = features_cv("tiny_cnn", paths, params=outer["params"], seed=42,
                            weights="random", with_test=False, folds=[o], settings=train_settings())
        assert outer["macro_f1"] == pytest.approx(again.per_fold[0]["macro_f1"])
    # Scrambling outer fold 0's labels changes nothing its search saw.
    folds = pd.read_csv(paths.folds_csv)
    rows = folds.fold == 0
    folds.loc[rows, "label"] = folds.loc[rows, "label"].sample(frac=1, random_state=3).map(
        {"Luminal A": "Triple negative", "Luminal B": "Luminal A", "HER2(+)": "Luminal B",
         "Triple negative": "HER2(+)"}).to_numpy()
    folds.to_csv(paths.folds_csv, index=False)
    scrambled = run_tune(paths, None, load_config("tune", {"estimate_trials": 2}),
                         settings=train_settings(), backbones=["tiny_cnn"], estimate=True,
                         space_file=space, weights="random")["tiny_cnn"]
    first, second = on_disk["outer"][0], scrambled["outer"][0]
    assert second["params"] == first["params"]
    assert second["search_score"] == pytest.approx(first["search_score"], abs=1e-12)


def trials_of_any(paths) -> list:
    db = paths.runs_dir / "optuna.db"
    if not db.exists():
        return []
    return optuna.get_all_study_names(storage=f"sqlite:///{db}")


def test_estimate_refuses_the_full_objective_with_the_fix(tmp_path, capsys):
    from kit.cli import main

    paths = make_workdir(tmp_path / "w", n_train=8, n_test=2, k=1, size=32, n_folds=2)
    rc = main(["tune", "tiny_cnn", "--objective", "full", "--estimate", "--workdir",
               str(paths.root), "--weights", "random"])
    err = capsys.readouterr().err
    assert rc == 2 and "supports the features objective only" in err
    assert "./run.sh tune tiny_cnn --estimate" in err and "--folds-per-trial" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- another task
def test_tune_maximises_the_tasks_metric_and_names_it(tmp_path, capsys):
    from cv_data import make_task_workdir
    from kit.metrics import score

    paths, data = make_task_workdir(tmp_path / "w", tmp_path / "data", n_folds=3)
    space = space_file(tmp_path, lr=LR, epochs=4, patience=0)
    best = run_tune(paths, data, load_config("tune", {"trials": 2}), settings=train_settings(),
                    backbones=["tiny_cnn"], space_file=space, weights="random",
                    seed=42)["tiny_cnn"]
    on_disk = yaml.safe_load((paths.tune_dir("tiny_cnn") / "best.yaml").read_text())
    assert on_disk["metric"] == best["metric"] == "balanced_accuracy"
    trials = trials_of(paths, "tiny_cnn-features")
    for t in trials:
        res = features_cv("tiny_cnn", paths, params=t.user_attrs["params"], seed=42,
                          weights="random", with_test=False, settings=train_settings(),
                          task=data.task)
        columns = data.task.prob_columns
        assert list(res.oof.columns) == ["sample_index", "fold", "label", *columns]
        assert res.oof_score == pytest.approx(score("balanced_accuracy", res.oof.label,
                                                    res.oof[columns].to_numpy(),
                                                    data.task.classes))
        if t.state.name == "COMPLETE":
            assert t.value == pytest.approx(res.oof_score, abs=1e-12)
        per_fold = {r["fold"]: r["score"] for r in res.per_fold}
        assert t.intermediate_values == pytest.approx(
            {k: per_fold[k] for k in t.intermediate_values})
    assert on_disk["score"] == max(t.value for t in trials if t.state.name == "COMPLETE")
    out = capsys.readouterr().out
    assert "objective features (balanced accuracy)" in out
    assert f"trial 0 balanced accuracy {trials[0].value:.4f}" in out
    assert f"search balanced accuracy {on_disk['search_score']:.4f}" in out
    # A study holds the scores of one task: the same task scored by macro F1 starts another.
    from kit.task import Data

    other = Data(data.root, data.task.model_copy(update={"metric": "macro_f1"}))
    with pytest.raises(KitError, match="made with other task"):
        run_tune(paths, other, load_config("tune", {"trials": 3}),
                 settings=train_settings(), backbones=["tiny_cnn"], space_file=space,
                 weights="random", seed=42)


def test_estimate_on_a_task_keeps_patients_on_one_side(tmp_path, monkeypatch):
    """tune --estimate on another task: scored by its metric, and every inner split (each
    outer fold's search trains with early stopping on an inner split) keeps a patient whole."""
    import json

    from cv_data import make_task_workdir
    from kit.training import selection

    paths, data = make_task_workdir(tmp_path / "w", tmp_path / "data", n_folds=3)
    calls, real = [], selection.grouped_splits

    def spy(y, groups=None, n_splits=5, seed=42, **kw):
        splits = real(y, groups, n_splits, seed, **kw)
        calls.append((None if groups is None else np.asarray(groups), splits))
        return splits
    monkeypatch.setattr(selection, "grouped_splits", spy)
    space = space_file(tmp_path, lr=LR, epochs=3, patience=0)
    record = run_tune(paths, data, load_config("tune", {"estimate_trials": 2}),
                      settings=train_settings({"early_stopping": "inner"}),
                      backbones=["tiny_cnn"], estimate=True, space_file=space,
                      weights="random")["tiny_cnn"]
    on_disk = json.loads((paths.tune_dir("tiny_cnn") / "estimate.json").read_text())
    assert on_disk["metric"] == record["metric"] == "balanced_accuracy"
    lo, hi = on_disk["estimate_ci95"]
    assert lo <= on_disk["score"] <= hi and "macro_f1" in on_disk
    assert on_disk["early_stopping"] == "inner" and on_disk["honest"] is True
    assert calls  # every head of every search chose its epoch on an inner split
    for groups, splits in calls:
        assert groups is not None and len(set(groups)) < len(groups)
        for fit, held in splits:
            assert set(groups[fit]).isdisjoint(groups[held])


# --------------------------------------------------------------------------- --set train.*
def test_set_train_reaches_every_trial_beneath_the_searched_values(feat_work, tmp_path,
                                                                  monkeypatch, capsys):
    import kit.training.feature_cv
    from kit.cli import main

    seen, real = [], kit.training.feature_cv.fit

    def spy(model, source, rows, y, cfg, **kw):
        seen.append((cfg["epochs"], cfg["lr"], cfg["head"]["width"]))
        return real(model, source, rows, y, cfg, **kw)

    monkeypatch.setattr(kit.training.feature_cv, "fit", spy)
    space = space_file(tmp_path, lr=LR, patience=0)
    conf = tmp_path / "tune.yaml"
    conf.write_text(yaml.safe_dump({"trials": 2, "train": {"head": {"width": 16}}}))
    args = ["tune", "tiny_cnn", "--workdir", str(feat_work.root), "--weights", "random",
            "--space", str(space), "--study-suffix", "set", "--config", str(conf)]
    assert main([*args, "--set", "train.epochs=3", "--set", "train.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert seen and {e for e, _, _ in seen} == {3} and {w for _, _, w in seen} == {16}
    assert all(0.0 <= lr <= 0.02 for _, lr, _ in seen)  # the searched lr, not the 0.5 given
    assert "tune tiny_cnn: train.lr is in the search space: each trial uses its own value" \
        in out
    best = yaml.safe_load((feat_work.tune_dir("tiny_cnn") / "best.yaml").read_text())
    assert best["train_overrides"] == {"epochs": 3, "lr": 0.5, "head.width": 16}
    assert set(best["params"]) == {"lr", "patience"}
    # Checked by the schema before any work: no study, no trial.
    n_trials = len(trials_of(feat_work, "tiny_cnn-features-set"))
    for bad, match in ((["--set", "train.epochs=0"], "train: epochs = 0 is not allowed"),
                       (["--set", "train.epochz=3"], "unknown key 'epochz'"),
                       (["--set", "train=3"], "give training settings as train.KEY=VALUE")):
        seen.clear()
        assert main([*args, "--trials", "4", *bad]) == 2
        err = capsys.readouterr().err
        assert match in err and "tune: " in err and "Traceback" not in err
        assert not seen and len(trials_of(feat_work, "tiny_cnn-features-set")) == n_trials
