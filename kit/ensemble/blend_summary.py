"""What ``./run.sh blend`` prints: baselines, the blend, the bias gain, nested against
in-sample scores (each in the task's metric with its 95 % interval over images), the test
class mix, and a warning per collapsed input that got weight."""
from __future__ import annotations

import numpy as np

from kit.ensemble.blend import BlendResult
from kit.metrics import format_ci, get_metric


def collapse_warnings(weights: dict[str, float], meta: dict[str, dict]) -> list[str]:
    """One warning per backbone whose collapsed model(s) got blend weight."""
    out = []
    for bb, m in meta.items():
        got = sum(w for name, w in weights.items() if name.split("/")[0] == bb)
        if m.get("collapsed") and got > 0:
            out.append(f"WARNING: {bb} gets weight {got:.3f} but {m['collapsed']}")
    return out


def score_of(block: dict, key: str = "score") -> float:
    """A blend score record's value in the task's metric: ``score`` (``score_no_bias``...),
    else ``macro_f1`` (``macro_f1_no_bias``) as records written before tasks hold it."""
    if key in block:
        return block[key]
    return block[key.replace("score", "macro_f1", 1)]


def expected_lines(expected: dict, in_sample: float, expected_ci=None,
                   in_sample_ci=None) -> list[str]:
    """The expected-score line(s), each in the metric with its 95 % interval: labelled
    optimistic, naming the inputs and why, when any input's OOF predictions chose something
    on their own rows."""
    title = get_metric(expected.get("metric", "macro_f1")).title
    head = f"expected {title} (nested): {format_ci(score_of(expected), expected_ci)}"
    tail = f"in-sample (optimistic): {format_ci(in_sample, in_sample_ci)}"
    chosen = [f"  {expected['chosen_between_two']}"] if expected.get("chosen_between_two") \
        else []
    if expected["honest"]:
        return [f"{head}; {tail}",
                "  every input chose its epochs and params without its own OOF rows", *chosen]
    out = [f"{head} -- OPTIMISTIC, not the expected score: {len(expected['why'])} input(s) "
           f"chose something on their own OOF rows; {tail}"]
    out += [f"  {bb}: {'; '.join(reasons)}" for bb, reasons in expected["why"].items()]
    return out + chosen


def _gain(gain: dict | None, plain: float) -> str:
    """A paired difference with its interval: ``+0.012 [-0.01, +0.03]``."""
    if not gain:
        return f"{plain:+.3f}"
    lo, hi = gain["ci95"]
    return f"{gain['diff']:+.3f} [{lo:+.2f}, {hi:+.2f}]"


def format_summary(result: BlendResult) -> str:
    """The lines ``./run.sh blend`` prints: baselines, blend, bias gain, nested vs in-sample,
    each in the task's metric with its 95 % bootstrap interval over images."""
    s, ins = result.scores, result.inputs
    base, nested, in_sample = s["baselines"], s["nested"], s["in_sample"]
    title = get_metric(result.metric).title
    head = f"OOF {title} [95% CI over images]"
    width = max(34, len(head) + 1)  # a longer metric title widens the first column

    def row(label, a, b=""):
        return f"  {label:<{width}}{a:>24}{b:>24}"

    def f1(block, key="score", ci="ci95"):
        return format_ci(score_of(block, key), block.get(ci))

    weights = ", ".join(f"{m} {w:.3f}" for m, w in sorted(result.weights.items(),
                                                          key=lambda kv: -kv[1]) if w > 0)
    biases = ", ".join(f"{c} {b:+.2f}" for c, b in result.biases.items())
    gain_in = score_of(in_sample) - score_of(in_sample, "score_no_bias")
    gain_nested = score_of(nested) - score_of(nested, "score_no_bias")
    lines = [
        f"blend of {len(ins.backbones)} backbone(s) ({', '.join(ins.backbones)}), "
        f"{len(ins.models)} library model(s), objective {result.objective}, "
        f"{len(ins.ids)} OOF images in {len(np.unique(ins.folds))} folds",
        row(head, "in-sample (optimistic)", "nested (expected)"),
        row(f"best single ({base['best_single']['model']})", f1(base["best_single"]),
            "(picked on OOF)"),
        row("equal weights", f1(base["equal_weights"]), "(not fitted)"),
        row("blend, argmax", f1(in_sample, "score_no_bias", "ci95_no_bias"),
            f1(nested, "score_no_bias", "ci95_no_bias")),
        row("blend + class biases", f1(in_sample), f1(nested)),
        row("bias gain (paired)", _gain(in_sample.get("bias_gain"), gain_in),
            _gain(nested.get("bias_gain"), gain_nested)),
        f"weights: {weights}",
        f"class biases (log p): {biases}",
    ]
    lines += prior_lines(result)
    lines += expected_lines(result.expected, score_of(in_sample), nested.get("ci95"),
                            in_sample.get("ci95"))
    lines += collapse_warnings(result.weights, ins.meta)
    if result.cfg["biases"] and gain_nested < 0:
        lines.append("note: the class biases lower the nested score here (too few images to "
                     "tune them?); consider 'biases: false' in a --config file")
    if result.csv_path is not None:
        lines += [f"submission -> {result.csv_path} ({len(result.test_labels)} rows, "
                  f"sha256 {result.csv_sha256[:12]})",
                  f"manifest   -> {result.manifest_path}",
                  f"latest     -> {result.latest_csv} (+ {result.latest_manifest.name})"]
    return "\n".join(lines)


def prior_lines(result: BlendResult) -> list[str]:
    """With ``prior: em``: the test class mix EM found and the biases applied for it."""
    rule = result.prior
    if rule is None or rule.mode == "train":
        return []

    classes = result.task.classes

    def mix(values):
        return ", ".join(f"{c} {v:.3f}" for c, v in zip(classes, values))

    est, alpha = rule.estimate, float(result.cfg["em_alpha"])
    verdict = (f"p = {est.p_value:.2g} < {alpha:g}: the test labels are decided for EM's mix"
               if est.shifted else
               f"p = {est.p_value:.2g} >= {alpha:g}: no clear shift, the OOF mix is kept")
    lines = [f"test class mix by EM ({est.n_iter} steps): {mix(est.em)}; OOF labels: "
             f"{mix(rule.train_mix)}",
             f"  likelihood-ratio test against the OOF mix: {verdict}"]
    if est.shifted:
        lines.append("  class biases applied for it (log p, on the adjusted probabilities): "
                     + ", ".join(f"{c} {b:+.2f}" for c, b in zip(classes, rule.biases)))
    shifted = sum(f.prior is not None and f.prior.estimate.shifted
                  for f in result.search.fold_fits.values())
    lines.append(f"  the nested score does the same on each held-out fold ({shifted} of "
                 f"{len(result.search.fold_fits)} folds shifted)")
    return lines
