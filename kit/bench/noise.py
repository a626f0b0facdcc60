"""``./run.sh bench noise``: which accuracy levers pay when labels are noisy, scored on held-back
test labels.

Levers ("arms"), each a plain ``train.yaml`` override of a head on cached embeddings,
compared with a baseline (``label_issues.mode: off``, ``bag: 1``, ``head.type: mlp``,
``head.pool: mean_prob``: the kit's defaults before issue 23, pinned so that the baseline
stays what it was when a default changes) one change at a time (no cross product):

- ``drop`` / ``weight``: ``label_issues.mode`` (cleanlab flags from an inner cross-validation
  on each fold's training rows; train without them / draw by label quality);
- ``bag5``: ``bag: 5`` heads per fold, probabilities averaged;
- ``logreg``: ``head.type: logreg`` (the linear probe; what ``head.type: auto``, the default,
  resolves to on cached embeddings);
- ``attention``: ``head.pool: attention`` (gated attention MIL over the patches);
- ``drop+bag5``: both.

And one bound, not a lever (``oracle``): the baseline trained on the labels the generator
drew (its flipped training labels put back), on the same images and with the same test
labels. No label-cleaning lever can do better than that, so its gain over the baseline is
the most any of them could gain on this data.

Two data regimes from :mod:`kit.data.synth`, with the test labels held back
(``test_labels_heldout.csv``) and ``label_noise`` on both splits, so that OOF and test are
scored against labels of the same quality, as the leaderboard's are:

- ``easy``: ``bench honesty``'s data (label noise 0.1, class signal 0.4);
- ``hard``: the same signal with label noise high enough that the baseline's test macro F1
  lands near 0.5, where the real leaderboard sits (the level was calibrated with the baseline
  alone, on seeds the bench does not use: docs/benchmarks.md);
- ``weak`` and ``weak_hard``: the easy and the hard sets (the same files), read by a stand-in
  pretrained for one epoch instead of 12 (``Preset.weak_standin``): a backbone that reads the
  classes less well, where the head has more to make up for.

The backbone is ``bench honesty``'s frozen stand-in for a pathology backbone: ``tiny_cnn``
trained from scratch on an independent generated set (easy-like labels) and loaded with
``--weights``; heads train on its cached embeddings (``train_norm: none``). Each seed is an
independently generated set; the same stand-in serves every seed of the hard and easy regimes,
the weak one has its own.

Per arm and regime, over seeds: test macro F1, OOF macro F1 (scored on every image), OOF -
test, the test F1 difference from the baseline on the same set with a paired bootstrap
interval per seed (:func:`kit.metrics.paired_bootstrap`, images resampled) and a pooled one
for the mean (:func:`pooled_ci`), wall and CPU seconds of the cv call and, for the
label-issue arms, how many training images were flagged and the precision and recall of
those flags against the labels the generator really flipped (recomputed from its plan:
:func:`drawn_labels`). As diagnostics only: the test F1 against the drawn (noise-free) test
labels (on noisy test labels a better model's gain is shrunk by the noise, on the drawn ones
it is not) and each set's test ceiling, the score of predicting every drawn class.

Everything is kept under ``runs/bench/noise/<preset>/`` (data and stages reused while their
inputs match, as in ``bench honesty``; cv runs always retrained) and the results go to
``results.json`` there. The generator's truth is recomputed by :mod:`kit.bench.label_truth`,
the summary over seeds and its table are :mod:`kit.bench.noise_summary`'s.
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from kit import PROB_COLUMNS
from kit.bench import heldout
from kit.bench.heldout import (
    BACKBONE,
    cpu_seconds,
    generated_data_arguments,
    heldout_labels,
    parse_names,
    prepare_seed,
    preset_and_seeds,
    read_table,
    run_data_stages,
    warm_up,
)
from kit.bench.honesty import build_standin
from kit.bench.label_truth import drawn_labels, flag_quality, noise_counts
from kit.bench.noise_summary import BASELINE, ORACLE, checks, format_table, summarise
from kit.config import deep_update, train_settings
from kit.paths import Paths
from kit.utils import KitError, atomic_write_json, progress

# Torch, the stages, the metrics and pandas are imported in the functions that use them: a
# bench module is imported to build its --help (kit/bench/__init__.py).

# Arm -> train.yaml overrides on top of the baseline. One change each, plus drop + bag,
# and the oracle bound.
ARMS = {
    BASELINE: {},
    "drop": {"label_issues": {"mode": "drop"}},
    "weight": {"label_issues": {"mode": "weight"}},
    "bag5": {"bag": 5},
    "logreg": {"head": {"type": "logreg"}},
    "attention": {"head": {"pool": "attention"}},
    "drop+bag5": {"label_issues": {"mode": "drop"}, "bag": 5},
    ORACLE: {},  # a bound: the baseline on the drawn training labels (score_arm)
}
REGIMES = ("hard", "easy")
# bench noise's regimes: bench regions' and the weak stand-in's.
WEAK = "weak"
WEAK_HARD = "weak_hard"
# A weak regime -> the regime whose sets (same files, same stages) it reads.
WEAK_SETS = {WEAK: "easy", WEAK_HARD: "hard"}
NOISE_REGIMES = (*REGIMES, *WEAK_SETS)
# Every arm's head before its change: the defaults before issue 23 made head.type auto.
BASELINE_HEAD = {"head": {"type": "mlp"}}# The feature-cache path: nothing in the backbone trains.
FROZEN = {"train_norm": "none", "unfreeze_last": 0}
# What bench honesty's quick data uses (the easy regime) and the hard regime's label noise,
# calibrated with the baseline alone on seeds 1000-1002 (docs/benchmarks.md).
SIGNAL = 0.4
EASY_NOISE = 0.1
HARD_NOISE = 0.45


@dataclass(frozen=True)
class Preset:
    """Sizes of one run of the bench.

    ``data``: :func:`kit.data.synth.generate` arguments of the scored sets without the seed
    and the label noise (each regime sets its own, ``noise``); ``standin_data``: of the
    stand-in's training set. ``patches``/``folds``/``train``: overrides of ``patches.yaml``,
    ``folds.yaml`` and ``train.yaml`` (every arm); ``standin``: of the stand-in's training.
    """
    name: str
    data: dict
    standin_data: dict
    noise: dict = field(default_factory=lambda: {"hard": HARD_NOISE, "easy": EASY_NOISE,
                                                 WEAK: EASY_NOISE, WEAK_HARD: HARD_NOISE})
    patches: dict = field(default_factory=dict)
    folds: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    standin: dict = field(default_factory=dict)
    seeds: int = 3
    # The weak regime's stand-in: these over ``standin`` (fewer epochs).
    weak_standin: dict = field(default_factory=lambda: {"epochs": 1})

    def regime(self, regime: str):
        """The :class:`kit.bench.heldout.Preset` of one regime (its data stages and stand-in
        helpers take one)."""
        standin = {**self.standin, **self.weak_standin} if regime in WEAK_SETS else \
            self.standin
        return heldout.Preset(f"{self.name}-{regime}",
                              data={**self.data, "label_noise": float(self.noise[regime])},
                              standin_data=self.standin_data, patches=self.patches,
                              folds=self.folds, train=self.train, standin=standin,
                              seeds=self.seeds)


def _presets() -> dict[str, Preset]:
    from kit.data import synth

    quick_data = dict(n_train=100, n_test=120, short_side=160, long_side_max=320, signal=SIGNAL)
    standin_quick = {**quick_data, "n_train": 160, "n_test": 4, "label_noise": EASY_NOISE}
    mid = synth.preset("v2", short_side=256, long_side_max=512, signal=SIGNAL)
    return {
        # bench honesty's quick sets and stand-in (a minute or two on a 2-core CPU for both
        # regimes, 3 seeds and every arm), with the kit's default head training (30 epochs:
        # honesty's 8 leave an MLP under-trained on ~60 images a fold). ~85 training images
        # after the junk: too few to read a lever's gain; this size checks the bench.
        "quick": Preset(
            "quick", data=quick_data, standin_data=standin_quick,
            patches={"size": 48, "stride": 24, "top_k": 6}, folds={"n_splits": 3},
            train={"inner_folds": 3},
            standin={"epochs": 12, "patience": 0, "lr": 3e-3}),
        # The v2 counts and junk (691 training, 477 test images) on 256 px scans, 64 px
        # patches, the default 5 folds and training settings: the real data's sample sizes,
        # which set how noisy the scores are (about an hour on a 2-core CPU).
        "standard": Preset(
            "standard", data=mid,
            standin_data={**mid, "n_test": 8, "label_noise": EASY_NOISE},
            patches={"size": 64, "stride": 32, "top_k": 12},
            standin={"epochs": 12, "patience": 0, "lr": 3e-3}),
    }


def regime_arguments(parser, regimes=REGIMES) -> None:
    """``--seeds`` and ``--regimes``: the options of a bench that scores each generated set
    in the hard and the easy regime (bench noise, bench regions), and the weak one (bench
    noise)."""
    parser.add_argument("--seeds", type=int, default=None,
                        help="independently generated sets per regime (default: 3)")
    weak = f" and/or {WEAK} and {WEAK_HARD} (the easy and hard sets read by a stand-in " \
        "pretrained for fewer epochs)" if WEAK in regimes else ""
    parser.add_argument("--regimes", default=",".join(regimes),
                        help="hard (label noise near the leaderboard's level) and/or easy "
                             f"(bench honesty's data){weak} (default: {','.join(regimes)})")


def add_arguments(parser):
    generated_data_arguments(parser, "noise")
    parser.add_argument("--preset", choices=tuple(_presets()), default="quick",
                        help="quick: 100/120 small scans, 3 folds, 8 epochs (minutes on a CPU); "
                             "standard: the v2 counts (691/477) on 256 px scans, 5 folds, "
                             "default training (about an hour on a CPU) (default: quick)")
    regime_arguments(parser, NOISE_REGIMES)
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"levers, comma-separated, of {', '.join(ARMS)}; the baseline is "
                             f"always run; oracle is a bound (the baseline trained on the labels "
                             f"the generator drew) (default: all)")
    parser.add_argument("--hard-noise", type=float, default=None,
                        help=f"label_noise of the hard regime (default: {HARD_NOISE}, "
                             "calibrated so the baseline scores ~0.5 on test)")


def run(args) -> int:
    preset, seeds = preset_and_seeds(args, _presets()[args.preset], "noise")
    if args.hard_noise is not None:
        if not 0 <= args.hard_noise < 0.75:
            raise KitError(f"--hard-noise must be in [0, 0.75) (got {args.hard_noise}): at 0.75 "
                           "a flipped label is as likely as the drawn one")
        preset = replace(preset, noise={**preset.noise, "hard": args.hard_noise})
    result = run_noise(Paths.from_root(getattr(args, "workdir", None)), preset, seeds=seeds,
                       arms=parse_names(args.arms, tuple(ARMS), "--arms"),
                       regimes=parse_names(args.regimes, NOISE_REGIMES, "--regimes"),
                       device=args.device)
    print(format_table(result))
    print(f"written {result['results_json']}")
    return 0


# --------------------------------------------------------------------------- the harness
def run_noise(paths: Paths, preset: Preset, seeds, arms=tuple(ARMS), regimes=NOISE_REGIMES,
              device=None) -> dict:
    """Every arm on each regime and seed: OOF and test macro F1, the difference from the
    baseline, seconds and the label-issue flags' quality.

    Parameters
    ----------
    paths : kit.paths.Paths
        Its ``runs/bench/noise/<preset>/`` holds the data, work directories and results.
    preset : Preset
    seeds : list of int
        One independently generated set per seed and regime.
    arms, regimes : sequence of str
        Of :data:`ARMS` (the baseline is added, first, when missing) and
        :data:`NOISE_REGIMES`.

    Returns
    -------
    dict
        ``runs`` (one record per regime, seed and arm), ``summary`` (one row per regime and
        arm, over seeds), ``checks`` (the issue's targets) and where things are; also written
        to ``results.json``.
    """
    arms = [BASELINE] + [a for a in arms if a != BASELINE]
    root = paths.runs_dir / "bench" / "noise" / preset.name
    t_start = time.perf_counter()
    # One stand-in for the hard and easy regimes (a pretrained backbone does not know this
    # task's labels), a weaker one for the weak regime; each built when first needed.
    standins = {}

    def standin_of(regime: str) -> dict:
        kind = WEAK if regime in WEAK_SETS else "easy"
        if kind not in standins:
            folder = root / ("standin-weak" if kind == WEAK else "standin")
            standins[kind] = build_standin(folder, preset.regime(kind), seeds[0], device)
        return standins[kind]

    runs, data_info = [], {}

    def result(complete: bool) -> dict:
        out = {"preset": preset.name, "seeds": list(seeds), "arms": list(arms),
               "regimes": list(regimes), "backbone": BACKBONE,
               "standin": standins.get("easy"), "standin_weak": standins.get(WEAK),
               "data": data_info, "complete": complete,
               "settings": {"data": preset.data, "noise": preset.noise,
                            "standin_data": preset.standin_data, "patches": preset.patches,
                            "folds": preset.folds, "train": {**FROZEN, **preset.train},
                            "arms": {a: arm_config(a, preset) for a in arms},
                            "weak_standin": preset.weak_standin},
               "runs": runs, "summary": summarise(runs, arms, regimes),
               "seconds": round(time.perf_counter() - t_start, 1),
               "results_json": str(root / "results.json")}
        out["checks"] = checks(out["summary"])
        return out

    jobs = [(regime, seed, arm) for regime in regimes for seed in seeds for arm in arms]
    current = None
    for regime, seed, arm in progress(jobs, desc="bench noise", unit="cv run"):
        if current != (regime, seed):  # the set's first run: data, stages, labels
            current = (regime, seed)
            # The weak regime reads the easy sets: same files, same stages.
            data_regime = WEAK_SETS.get(regime, regime)
            data, wpaths, info = prepare_seed(root / data_regime / f"seed{seed}",
                                              preset.regime(data_regime), seed)
            truth = heldout_labels(data)
            plan = drawn_labels(data)
            info["noise"] = noise_counts(plan)
            data_info[f"{regime}/{seed}"] = info
            warm_up(wpaths, device)
        if arm == ORACLE:
            run_paths = oracle_set(root / regime / f"seed{seed}" / "oracle", data, plan,
                                   preset.regime(regime), seed)
        else:
            run_paths = wpaths
        rec = score_arm(arm, regime, run_paths, truth, plan, preset, seed, standin_of(regime),
                        device, dest_paths=wpaths)
        if arm != BASELINE:
            base = next(r for r in runs if (r["regime"], r["seed"], r["arm"])
                        == (regime, seed, BASELINE))
            rec["vs_baseline"] = compare(base, rec, wpaths, truth, plan)
        runs.append(rec)
        atomic_write_json(root / "results.json", result(False))  # kept if a later run fails
    out = result(True)
    atomic_write_json(root / "results.json", out)
    return out


def arm_config(arm: str, preset: Preset) -> dict:
    """The ``train.yaml`` overrides of one arm: frozen backbone, the baseline's head, the
    preset's training settings and the arm's change."""
    base = deep_update(BASELINE_HEAD, {**FROZEN, **copy.deepcopy(preset.train)})
    return deep_update(base, copy.deepcopy(ARMS[arm]))  # copied: the table stays as written


def run_name(arm: str, regime: str = "") -> str:
    """The run folder of an arm (``runs/noise-<arm>``; ``+`` is kept out of folder names); the
    weak regime's runs, which share the easy sets' work directory, are ``noise-weak-<arm>``."""
    return "noise-" + ("weak-" if regime in WEAK_SETS else "") + arm.replace("+", "-")


def score_arm(arm: str, regime: str, paths, truth: dict, plan, preset: Preset, seed: int,
              standin: dict, device=None, dest_paths=None) -> dict:
    """One cv run of ``arm`` in work directory ``paths``, its outputs moved to
    ``dest_paths``'s ``runs/noise-<arm>/``: OOF and test macro F1 (with intervals), seconds,
    and for the label-issue arms the flags against the labels the generator flipped.

    OOF is scored against the written (noisy) training labels, every arm alike: for the
    oracle, whose cv scored its OOF against the drawn labels, from its ``oof.csv``."""
    import numpy as np

    from kit.metrics import bootstrap_ci, macro_f1
    from kit.training.cv import run_cv

    cfg = arm_config(arm, preset)
    t0, c0 = time.perf_counter(), cpu_seconds()
    metrics = run_cv(paths, None, train_settings(cfg), backbone=BACKBONE, seed=seed,
                     weights=standin["file"], params="none", restart=True, device=device)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    if metrics.get("training_path") != "feature_cache":
        raise KitError(f"bench noise: the {arm} run trained on the {metrics.get('training_path')}"
                       " path; the bench's settings no longer select the feature cache")
    dest = (dest_paths or paths).backbone_dir(run_name(arm, regime))
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(paths.backbone_dir(BACKBONE), dest)
    test = read_table(dest / "test.csv")
    probs = test[list(PROB_COLUMNS)].to_numpy()
    y_test = [truth[s] for s in test.sample_index]
    y_clean = plan["test"].loc[test.sample_index].drawn.tolist()
    test_f1, oof = macro_f1(y_test, probs), float(metrics["oof_macro_f1"])
    if arm == ORACLE:  # its cv scored the drawn labels; score the written ones, as the others
        oof_frame = read_table(dest / "oof.csv")
        oof = macro_f1(plan["train"].loc[oof_frame.sample_index].written.tolist(),
                       oof_frame[list(PROB_COLUMNS)].to_numpy())
    n_rows = len(read_table(paths.folds_csv)) if paths.folds_csv.exists() else None
    config = metrics.get("config") or {}
    rec = {"regime": regime, "seed": seed, "arm": arm, "name": run_name(arm, regime),
           "oof": oof, "oof_ci95": metrics.get("oof_macro_f1_ci95"),
           "test": test_f1, "test_ci95": list(bootstrap_ci(y_test, probs)),
           "test_clean": macro_f1(y_clean, probs),
           "gap": oof - test_f1,
           "n_oof": metrics.get("n_oof"), "n_train_rows": n_rows, "n_test": len(test),
           "seconds": float(metrics.get("seconds", math.nan)),
           "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
           # what cv recorded it ran: shows the override took
           "recorded": {"label_issues": (config.get("label_issues") or {}).get("mode"),
                        "bag": config.get("bag"),
                        "head_type": (config.get("head") or {}).get("type"),
                        "pool": (config.get("head") or {}).get("pool")},
           "pred_share": np.bincount(probs.argmax(1), minlength=len(PROB_COLUMNS))
           .round(0).tolist()}
    if ARMS[arm].get("label_issues", {}).get("mode", "off") != "off":
        rec["flags"] = flag_quality(dest, plan)
    return rec


def oracle_set(folder: Path, data, plan, hpreset, seed: int):
    """The oracle's work directory: set ``data`` with its training labels replaced by the
    drawn classes (images linked, not copied), its data stages run. Reused while the set and
    the stages' settings are the same (the stage stamp includes the set's ``demo.json``, of
    which the drawn labels are a function)."""
    from kit.data import synth

    data, odata = Path(data).resolve(), Path(folder) / "data"
    odata.mkdir(parents=True, exist_ok=True)
    for sub in ("train_data", "test_data"):
        link = odata / sub
        if not link.is_symlink():
            link.symlink_to(data / sub, target_is_directory=True)
    labels = read_table(data / "train_labels.csv")
    labels["label"] = plan["train"].loc[labels.sample_index].drawn.values
    text = labels.to_csv(index=False, lineterminator="\n")
    target = odata / "train_labels.csv"
    if not target.is_file() or target.read_text() != text:
        target.write_text(text)
    for name in (synth.META_JSON, synth.JUNK_CSV):
        shutil.copyfile(data / name, odata / name)
    paths = Paths.from_root(Path(folder) / "work")
    run_data_stages(odata, paths, hpreset, seed)
    return paths


def compare(base: dict, rec: dict, paths, truth: dict, plan) -> dict:
    """Paired bootstrap of the arm's test macro F1 minus the baseline's, on the same images
    (held-back labels), and the same difference on the drawn labels."""
    from kit.metrics import paired_bootstrap

    a = read_table(paths.backbone_dir(base["name"]) / "test.csv").set_index("sample_index")
    b = read_table(paths.backbone_dir(rec["name"]) / "test.csv").set_index("sample_index")
    ids = list(a.index)
    pa = a.loc[ids, list(PROB_COLUMNS)].to_numpy()
    pb = b.loc[ids, list(PROB_COLUMNS)].to_numpy()
    res = paired_bootstrap([truth[s] for s in ids], pa, pb)
    clean = paired_bootstrap(plan["test"].loc[ids].drawn.tolist(), pa, pb)
    return {"diff": res["diff"], "ci95": res["ci95"], "p_better": res["p_b_better"],
            "diff_clean": clean["diff"], "ci95_clean": clean["ci95"]}
