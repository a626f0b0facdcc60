"""``./run.sh bench blend``: the weight + bias search, nested included, on synthetic OOF data.

The default problem has the real data's shape: 581 clean images with its class counts,
3 backbones, 4 classes, 5 folds. Target: under 2 s on a 2-core CPU.

With ``--seeds N`` it also scores the blend on N generated problems with held-back test
labels (477 test images): the expected (nested) score against the test score, per
``prior`` (``train``, ``em``); ``--test-mix`` draws the test labels with another class mix
and ``--fold-noise`` makes each test row the mean of the fold models' probabilities, as
``cv``'s ``test.csv`` is (:func:`synthetic_problem`).
"""
from __future__ import annotations

import time

import numpy as np

from kit.config import load_config
from kit.utils import KitError, check_random_state

# Clean v2 training counts in kit.CLASSES order (LumA, LumB, HER2, TN).
REAL_COUNTS = (158, 204, 150, 69)


def add_arguments(parser):
    parser.add_argument("--images", type=int, default=581, help="OOF images (default: 581)")
    parser.add_argument("--backbones", type=int, default=3, help="library models (default: 3)")
    parser.add_argument("--folds", type=int, default=5, help="folds (default: 5)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats; the fastest is reported (default: 3)")
    parser.add_argument("--objective", choices=("f1", "logloss"), default="f1")
    parser.add_argument("--seeds", type=int, default=0,
                        help="also score expected vs held-back test macro F1, prior train vs "
                             "em, on this many generated problems (seeds --seed, --seed + 1, "
                             "...; default: 0, timing only)")
    parser.add_argument("--test-mix", default=None, metavar="A,B,C,D",
                        help="class mix of the generated test labels, in the kit's class "
                             "order (default: the training mix)")
    parser.add_argument("--fold-noise", type=float, default=0.0,
                        help="logit noise of each fold model: test rows average the fold "
                             "models, OOF rows see one (default: 0, one model)")


def synthetic_problem(n: int = 581, n_models: int = 3, n_folds: int = 5, n_test: int = 477,
                      seed=0, minority_scale: float = 0.35, signal=(1.2, 1.0, 0.8),
                      test_prior=None, fold_noise: float = 0.0) -> dict:
    """OOF/test probabilities of ``n_models`` correlated, imperfect models (4 classes).

    Each model's logits are ``signal_m * onehot(y)`` plus noise shared by all models and noise
    of its own; the last class's probability is then scaled by ``minority_scale`` and the rows
    renormalised (a model trained on an imbalanced set under-predicts the small class), which
    is what the class biases are there to undo.

    Parameters
    ----------
    test_prior : sequence of 4 floats, optional
        Class mix of the test labels (normalised); default: the training mix (``REAL_COUNTS``).
    fold_noise : float, default=0.0
        Standard deviation of logit noise of each of the ``n_folds`` fold models of a backbone,
        as ``cv`` trains them: an OOF row is predicted by its own fold's model, a test row by
        the mean of all fold models' probabilities (``runs/<bb>/test.csv``), hence less noisy
        and less extreme than OOF rows. 0: one model predicts both, as before (the same draws).

    Returns
    -------
    dict with ``oof`` (M x N x 4), ``test`` (M x T x 4), ``y`` (N), ``folds`` (N), ``y_test`` (T).
    """
    rng = check_random_state(seed)
    c = len(REAL_COUNTS)
    prior = np.asarray(REAL_COUNTS, dtype=float) / sum(REAL_COUNTS)
    mix = prior if test_prior is None else np.asarray(test_prior, float) / np.sum(test_prior)
    y = rng.choice(c, size=n, p=prior)
    y_test = rng.choice(c, size=n_test, p=mix)
    folds = np.empty(n, dtype=np.int64)
    for k in range(c):  # stratified: deal each class's shuffled rows round-robin
        idx = rng.permutation(np.flatnonzero(y == k))
        folds[idx] = (np.arange(len(idx)) + rng.integers(n_folds)) % n_folds
    signal = np.resize(np.asarray(signal, dtype=float), n_models)

    def softmax(logits):
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p[..., -1] *= minority_scale
        return p / p.sum(axis=-1, keepdims=True)

    def probs(labels, fold_of=None):
        shared = rng.normal(0, 1.0, (len(labels), c))
        out = []
        for m in range(n_models):
            logits = signal[m] * np.eye(c)[labels] + shared + rng.normal(0, 1.0, (len(labels), c))
            if fold_noise > 0:  # one model per fold: OOF rows see theirs, test rows the mean
                per_fold = logits + rng.normal(0, fold_noise, (n_folds, len(labels), c))
                out.append(softmax(per_fold[fold_of, np.arange(len(labels))])
                           if fold_of is not None else softmax(per_fold).mean(axis=0))
            else:
                out.append(softmax(logits))
        return np.stack(out)

    return {"oof": probs(y, folds), "test": probs(y_test), "y": y, "folds": folds,
            "y_test": y_test}


def parse_mix(text: str | None):
    """``--test-mix 0.15,0.2,0.25,0.4`` -> 4 shares summing to 1 (None: the training mix)."""
    if text is None:
        return None
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) != len(REAL_COUNTS) or min(values) <= 0:
        raise KitError(f"--test-mix {text!r}: give {len(REAL_COUNTS)} positive shares, one per "
                       "class in the kit's order (e.g. 0.15,0.2,0.25,0.4)")
    return np.asarray(values) / sum(values)


def score_seeds(n_seeds: int, first_seed: int = 42, test_mix=None, fold_noise: float = 0.0,
                priors=("train", "em"), images: int = 581, backbones: int = 3, folds: int = 5,
                objective: str = "f1") -> dict:
    """Expected (nested) and test macro F1 per ``prior`` on ``n_seeds`` generated problems.

    Returns
    -------
    dict
        ``per_seed``: one dict per seed and prior (``seed``, ``prior``, ``expected``, ``test``,
        ``mix_error``: L1 distance of the mix the rule assumed from the test labels' mix);
        ``summary``: per prior the means, ``gap`` (expected - test) and ``vs_train`` (test
        minus prior train's on the same seeds), each difference with its standard error
        over seeds.
    """
    from kit.ensemble.search import BlendSearch
    from kit.metrics import macro_f1

    rows = []
    for seed in range(first_seed, first_seed + n_seeds):
        prob = synthetic_problem(images, backbones, folds, seed=seed, test_prior=test_mix,
                                 fold_noise=fold_noise)
        truth = np.bincount(prob["y_test"], minlength=len(REAL_COUNTS)) / len(prob["y_test"])
        for prior in priors:
            est = BlendSearch(objective, load_config("blend", {"prior": prior}), seed).fit(
                prob["oof"], prob["y"], prob["folds"])
            rule = est.prior_rule(prob["test"])
            rows.append({"seed": seed, "prior": prior,
                         "expected": est.scores_["nested"]["macro_f1"],
                         "test": macro_f1(prob["y_test"], est.predict(prob["test"])),
                         "mix_error": float(np.abs(rule.mix - truth).sum())})
    summary = {}
    for prior in priors:
        mine = [r for r in rows if r["prior"] == prior]
        base = [r for r in rows if r["prior"] == priors[0]]
        summary[prior] = {
            "expected": _mean([r["expected"] for r in mine]),
            "test": _mean([r["test"] for r in mine]),
            "gap": _mean_se([r["expected"] - r["test"] for r in mine]),
            "vs_train": _mean_se([r["test"] - b["test"] for r, b in zip(mine, base)]),
            "mix_error": _mean([r["mix_error"] for r in mine])}
    return {"per_seed": rows, "summary": summary}


def _mean(values) -> float:
    return float(np.mean(values))


def _mean_se(values) -> list[float]:
    """[mean, standard error over seeds] (SE nan for one seed)."""
    v = np.asarray(values, float)
    se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return [float(v.mean()), se]


def format_seeds(res: dict, n_seeds: int, first_seed: int, test_mix,
                 fold_noise: float) -> list[str]:
    """The table of :func:`score_seeds`: one row per prior."""
    mix = "the training mix" if test_mix is None else ", ".join(f"{v:.2f}" for v in test_mix)
    lines = [f"  held-back test labels, {n_seeds} generated problems (seeds {first_seed}.."
             f"{first_seed + n_seeds - 1}), 477 test images with {mix}, fold noise {fold_noise}:",
             f"  {'prior':<7}{'expected':>10}{'test':>8}{'expected - test':>20}"
             f"{'test - train':>20}{'mix L1 error':>14}"]
    for prior, s in res["summary"].items():
        gap, vs = s["gap"], s["vs_train"]
        lines.append(f"  {prior:<7}{s['expected']:>10.4f}{s['test']:>8.4f}"
                     f"{gap[0]:>+12.4f} +- {gap[1]:.4f}{vs[0]:>+12.4f} +- {vs[1]:.4f}"
                     f"{s['mix_error']:>14.3f}")
    lines.append("  (+- : standard error over seeds; mix L1 error: |assumed - true test mix|)")
    return lines


def run(args) -> int:
    from kit.ensemble.search import BlendSearch
    from kit.metrics import format_ci

    cfg = load_config("blend")
    prob = synthetic_problem(args.images, args.backbones, args.folds, seed=args.seed)
    times = []
    for _ in range(max(1, args.repeats)):
        start = time.perf_counter()
        res = BlendSearch(args.objective, cfg, args.seed).fit(prob["oof"], prob["y"],
                                                              prob["folds"]).result_
        times.append(time.perf_counter() - start)
    s = res.scores
    best = min(times)
    print(f"bench blend: {args.images} images x {args.backbones} backbones x 4 classes, "
          f"{args.folds} folds, objective {args.objective}, {cfg['iterations']} greedy steps, "
          f"{cfg['bags']} bags, {cfg['bias_steps']}-point bias grid")
    print(f"  search time (full fit + {args.folds} nested fits + 95% intervals): {best:.3f} s "
          f"(fastest of {len(times)}; target < 2 s: {'met' if best < 2 else 'MISSED'})")
    base, ins, nested = s["baselines"], s["in_sample"], s["nested"]

    def f1(block, key="macro_f1", ci="ci95"):
        return format_ci(block[key], block[ci])

    print(f"  best single {f1(base['best_single'])}   equal weights {f1(base['equal_weights'])}"
          "   (macro F1 [95% CI over images])")
    print(f"  blend in-sample (optimistic) {f1(ins)} "
          f"(argmax {f1(ins, 'macro_f1_no_bias', 'ci95_no_bias')})   "
          f"nested {f1(nested)} (argmax {f1(nested, 'macro_f1_no_bias', 'ci95_no_bias')})")
    print(f"  nested-vs-in-sample gap: {s['gap']:+.4f}")
    if args.seeds > 0:
        mix = parse_mix(args.test_mix)
        start = time.perf_counter()
        res = score_seeds(args.seeds, args.seed, mix, args.fold_noise, images=args.images,
                          backbones=args.backbones, folds=args.folds, objective=args.objective)
        print("\n".join(format_seeds(res, args.seeds, args.seed, mix, args.fold_noise)))
        print(f"  ({time.perf_counter() - start:.0f} s)")
    return 0
