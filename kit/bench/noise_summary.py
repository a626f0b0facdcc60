"""``bench noise``'s summary over seeds: one row per regime and arm, the pooled interval of a
mean difference, the issue's targets checked, and the table the bench prints."""
from __future__ import annotations

import math

from kit.bench.heldout import BACKBONE, mean_of, num, per_seed_line

BASELINE = "baseline"
ORACLE = "oracle"
# The done-when of issue 15, checked in the summary.
TARGET_DROP_GAIN = 0.03
TARGET_GAP = 0.03


def _sd(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if len(values) < 2:
        return math.nan
    m = sum(values) / len(values)
    return float(math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)))


def summarise(runs: list[dict], arms, regimes) -> list[dict]:
    """One row per regime x arm, over seeds: means, per-seed values, the difference from the
    baseline (mean, sd over seeds, per-seed paired-bootstrap intervals) and flag counts summed
    over seeds."""
    rows = []
    for regime in regimes:
        for arm in arms:
            sel = [r for r in runs if r["regime"] == regime and r["arm"] == arm]
            if not sel:
                continue
            vs = [r.get("vs_baseline") or {} for r in sel]
            diffs = [v.get("diff", math.nan) for v in vs] if arm != BASELINE else []
            row = {"regime": regime, "arm": arm, "n": len(sel),
                   "seeds": [r["seed"] for r in sel],
                   "test": mean_of(r["test"] for r in sel),
                   "test_sd": _sd([r["test"] for r in sel]),
                   "oof": mean_of(r["oof"] for r in sel), "gap": mean_of(r["gap"] for r in sel),
                   "abs_gap": mean_of(abs(r["gap"]) for r in sel),
                   "test_clean": mean_of(r["test_clean"] for r in sel),
                   "per_seed_test": [r["test"] for r in sel],
                   "per_seed_oof": [r["oof"] for r in sel],
                   "per_seed_gap": [r["gap"] for r in sel],
                   "diff": mean_of(diffs) if diffs else math.nan,
                   "diff_sd": _sd(diffs) if diffs else math.nan,
                   "per_seed_diff": diffs,
                   "per_seed_ci95": [v.get("ci95") for v in vs] if diffs else [],
                   "diff_ci95": pooled_ci(diffs, [v.get("ci95") for v in vs]),
                   "diff_clean": mean_of(v.get("diff_clean", math.nan) for v in vs)
                   if diffs else math.nan,
                   "wall_seconds": mean_of(r["wall_seconds"] for r in sel),
                   "cpu_seconds": mean_of(r["cpu_seconds"] for r in sel)}
            flags = [r["flags"] for r in sel if (r.get("flags") or {}).get("recorded")]
            if flags:
                tot = {k: sum(f[k] for f in flags)
                       for k in ("assessed", "flagged", "bad", "true_flags")}
                row["flags"] = {**tot,
                                "share_flagged": tot["flagged"] / max(tot["assessed"], 1),
                                "precision": tot["true_flags"] / tot["flagged"]
                                if tot["flagged"] else math.nan,
                                "recall": tot["true_flags"] / tot["bad"]
                                if tot["bad"] else math.nan,
                                "base_rate": tot["bad"] / max(tot["assessed"], 1),
                                "quality_auc": mean_of(f["quality_auc"] for f in flags)}
            rows.append(row)
    return rows


def pooled_ci(diffs, cis) -> list[float]:
    """95 % interval of the mean over seeds of per-seed differences, from their per-seed
    paired-bootstrap intervals (normal approximation: each seed's standard error is its
    interval's width / 3.92, the seeds' test sets are independent). It covers the test
    images' sampling noise, not the spread between training runs (see the sd over seeds)."""
    pairs = [(d, c) for d, c in zip(diffs, cis)
             if c is not None and d is not None and not math.isnan(d)]
    if not pairs:
        return [math.nan, math.nan]
    mean = sum(d for d, _ in pairs) / len(pairs)
    se = math.sqrt(sum(((c[1] - c[0]) / 3.92) ** 2 for _, c in pairs)) / len(pairs)
    return [mean - 1.96 * se, mean + 1.96 * se]


def checks(summary: list[dict]) -> dict:
    """Issue 15's targets, as measured: drop's mean test gain on the hard regime (>= 0.03)
    with its mean OOF - test within 0.03, and the arms whose mean test F1 on the easy regime
    is below the baseline's (with the sd over seeds and the pooled interval of that
    difference; ``beyond_noise`` when the interval lies below 0)."""
    rows = {(r["regime"], r["arm"]): r for r in summary}
    out = {}
    drop = rows.get(("hard", "drop"))
    if drop:
        out["hard_drop_gain"] = {"value": drop["diff"], "target": TARGET_DROP_GAIN,
                                 "met": bool(drop["diff"] >= TARGET_DROP_GAIN)}
        out["hard_drop_gap"] = {"value": drop["gap"], "target": TARGET_GAP,
                                "met": bool(abs(drop["gap"]) <= TARGET_GAP),
                                "per_seed": drop["per_seed_gap"]}
    easy = [r for r in summary if r["regime"] == "easy" and r["arm"] not in (BASELINE, ORACLE)]
    if easy:
        lower = {r["arm"]: {"diff": r["diff"], "sd": r["diff_sd"], "ci95": r["diff_ci95"],
                            "beyond_noise": bool(r["diff_ci95"][1] < 0)}
                 for r in easy if r["diff"] < 0}
        out["easy_no_loss"] = {"met": not lower, "lower": lower}
    return out


def ci_text(ci) -> str:
    if not ci or any(v is None or math.isnan(v) for v in ci):
        return "-"
    return f"[{ci[0]:+.3f},{ci[1]:+.3f}]"


def format_table(result: dict) -> str:
    """The summary as text: one block per regime, then the per-seed values and the checks."""
    seeds = result["seeds"]
    noise = result["settings"]["noise"]
    lines = [f"bench noise ({result['preset']}): {BACKBONE} stand-in, frozen, heads on cached "
             f"embeddings; {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), "
             f"{result['seconds']:.0f} s in all",
             "  test = macro F1 on the held-back (noisy) test labels; OOF = out-of-fold macro F1 "
             "on every training image; means over seeds",
             "  d test = test - baseline's on the same set (mean, sd over seeds); CI = paired "
             "bootstrap 95 % intervals per seed, pooled = of the mean over seeds; clean = test F1 "
             "on the drawn (noise-free) labels, a diagnostic",
             "  flags: share of training images flagged (summed over folds and seeds), precision "
             "and recall against the flipped labels (base = share flipped)",
             f"  {ORACLE}*: a bound, not a lever: the baseline trained on the drawn training "
             "labels (no label-cleaning lever can beat it)"]
    for regime in result["regimes"]:
        rows = [r for r in result["summary"] if r["regime"] == regime]
        if not rows:
            continue
        ceiling = mean_of(d["noise"].get("test_ceiling", math.nan)
                        for key, d in result["data"].items() if key.startswith(f"{regime}/"))
        lines.append(f"  {regime}: label_noise {noise[regime]}, signal "
                     f"{result['settings']['data'].get('signal')}; test ceiling (the drawn class "
                     f"predicted for every image) {num(ceiling, '.3f')}")
        lines.append(f"    {'arm':<11}{'test':>7}{'OOF':>7}{'OOF-test':>9}{'d test':>8}"
                     f"{'(sd)':>7}{'pooled CI':>17}  {'per-seed d test [CI]':<58}{'clean':>7}"
                     f"{'d clean':>8}{'wall s':>8}  flags")
        for r in rows:
            per = "; ".join(f"{d:+.3f} [{c[0]:+.2f},{c[1]:+.2f}]"
                            for d, c in zip(r["per_seed_diff"], r["per_seed_ci95"]) if c)
            fl = r.get("flags")
            flags = (f"{fl['share_flagged']:.0%} flagged, prec {num(fl['precision'], '.2f')}, "
                     f"rec {num(fl['recall'], '.2f')} (base {fl['base_rate']:.2f}), "
                     f"AUC {num(fl['quality_auc'], '.2f')}") if fl else ""
            lines.append(f"    {r['arm'] + ('*' if r['arm'] == ORACLE else ''):<11}"
                         f"{num(r['test'], '.3f'):>7}{num(r['oof'], '.3f'):>7}"
                         f"{num(r['gap'], '+.3f'):>9}{num(r['diff'], '+.3f'):>8}"
                         f"{num(r['diff_sd'], '.3f'):>7}{ci_text(r.get('diff_ci95')):>17}"
                         f"  {per:<58}"
                         f"{num(r['test_clean'], '.3f'):>7}{num(r['diff_clean'], '+.3f'):>8}"
                         f"{num(r['wall_seconds'], '.0f'):>8}  {flags}")
        lines.append(per_seed_line(rows))
    c = result.get("checks") or {}
    if "hard_drop_gain" in c:
        g, gap = c["hard_drop_gain"], c["hard_drop_gap"]
        lines.append(f"  check: drop on hard raises test macro F1 by {g['value']:+.3f} (target >= "
                     f"+{g['target']:.2f}: {'met' if g['met'] else 'NOT met'}); its OOF - test "
                     f"{gap['value']:+.3f} (target |.| <= {gap['target']:.2f}: "
                     f"{'met' if gap['met'] else 'NOT met'})")
    if "easy_no_loss" in c:
        low = c["easy_no_loss"]["lower"]
        lines.append("  check: no lever lowers test macro F1 on easy: " + (
            "met" if not low else "NOT met: " + ", ".join(
                f"{a} {v['diff']:+.3f} (sd {num(v['sd'], '.3f')}, pooled CI "
                f"[{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
                f"{', beyond noise' if v['beyond_noise'] else ', within noise'})"
                for a, v in low.items())))
    for key, which in (("standin", "hard, easy"), ("standin_weak", "weak")):
        s = result.get(key)
        if s:
            lines.append(f"  stand-in backbone ({which}) {s['file']} ({BACKBONE} trained from "
                         f"scratch on an independent set; fold 0 OOF macro F1 "
                         f"{s['fold0_macro_f1']:.3f} there)")
    return "\n".join(lines)
