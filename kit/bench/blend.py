"""``./run.sh bench blend``: the weight + bias search, nested included, on synthetic OOF data.

The default problem has the real data's shape: 581 clean images with its class counts,
3 backbones, 4 classes, 5 folds. Target: under 2 s on a 2-core CPU.
"""
from __future__ import annotations

import time

import numpy as np

# Clean v2 training counts in kit.CLASSES order (LumA, LumB, HER2, TN).
REAL_COUNTS = (158, 204, 150, 69)


def add_arguments(parser):
    parser.add_argument("--images", type=int, default=581, help="OOF images (default: 581)")
    parser.add_argument("--backbones", type=int, default=3, help="library models (default: 3)")
    parser.add_argument("--folds", type=int, default=5, help="folds (default: 5)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats; the fastest is reported (default: 3)")
    parser.add_argument("--objective", choices=("f1", "logloss"), default="f1")


def synthetic_problem(n: int = 581, n_models: int = 3, n_folds: int = 5, n_test: int = 477,
                      seed=0, minority_scale: float = 0.35, signal=(1.2, 1.0, 0.8)) -> dict:
    """OOF/test probabilities of ``n_models`` correlated, imperfect models (4 classes).

    Each model's logits are ``signal_m * onehot(y)`` plus noise shared by all models and noise
    of its own; the last class's probability is then scaled by ``minority_scale`` and the rows
    renormalised (a model trained on an imbalanced set under-predicts the small class), which
    is what the class biases are there to undo.

    Returns
    -------
    dict with ``oof`` (M x N x 4), ``test`` (M x T x 4), ``y`` (N), ``folds`` (N), ``y_test`` (T).
    """
    from kit.utils import check_random_state

    rng = check_random_state(seed)
    c = len(REAL_COUNTS)
    prior = np.asarray(REAL_COUNTS, dtype=float) / sum(REAL_COUNTS)
    y = rng.choice(c, size=n, p=prior)
    y_test = rng.choice(c, size=n_test, p=prior)
    folds = np.empty(n, dtype=np.int64)
    for k in range(c):  # stratified: deal each class's shuffled rows round-robin
        idx = rng.permutation(np.flatnonzero(y == k))
        folds[idx] = (np.arange(len(idx)) + rng.integers(n_folds)) % n_folds
    signal = np.resize(np.asarray(signal, dtype=float), n_models)

    def probs(labels):
        shared = rng.normal(0, 1.0, (len(labels), c))
        out = []
        for m in range(n_models):
            logits = signal[m] * np.eye(c)[labels] + shared + rng.normal(0, 1.0, (len(labels), c))
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p[:, -1] *= minority_scale
            out.append(p / p.sum(axis=1, keepdims=True))
        return np.stack(out)

    return {"oof": probs(y), "test": probs(y_test), "y": y, "folds": folds, "y_test": y_test}


def run(args) -> int:
    from kit.ensemble.search import search
    from kit.config import load_config

    cfg = load_config("blend")
    prob = synthetic_problem(args.images, args.backbones, args.folds, seed=args.seed)
    times = []
    for _ in range(max(1, args.repeats)):
        start = time.perf_counter()
        res = search(prob["oof"], prob["y"], prob["folds"], cfg, args.objective, seed=args.seed)
        times.append(time.perf_counter() - start)
    s = res.scores
    best = min(times)
    print(f"bench blend: {args.images} images x {args.backbones} backbones x 4 classes, "
          f"{args.folds} folds, objective {args.objective}, {cfg['iterations']} greedy steps, "
          f"{cfg['bags']} bags, {cfg['bias_steps']}-point bias grid")
    print(f"  search time (full fit + {args.folds} nested fits): {best:.3f} s "
          f"(fastest of {len(times)}; target < 2 s: {'met' if best < 2 else 'MISSED'})")
    print(f"  best single {s['baselines']['best_single']['macro_f1']:.4f}   "
          f"equal weights {s['baselines']['equal_weights']['macro_f1']:.4f}")
    print(f"  blend in-sample (optimistic) {s['in_sample']['macro_f1']:.4f} "
          f"(argmax {s['in_sample']['macro_f1_no_bias']:.4f})   "
          f"nested {s['nested']['macro_f1']:.4f} (argmax {s['nested']['macro_f1_no_bias']:.4f})")
    print(f"  nested-vs-in-sample gap: {s['gap']:+.4f}")
    return 0
