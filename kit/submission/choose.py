"""``./run.sh choose``: the two submissions to select for the private leaderboard.

The first is the one with the highest estimated private score (the ledger's ``estimate``: the
nested expected score, combined with the public score by precision once Kaggle has scored it).
The second is the best of the rest by the same estimate, unless it is built from the same runs
as the first and a submission of other runs is within noise of it: then that one, because two
picks of the same runs fail together when those runs were lucky on the OOF rows, while other
runs hedge the bet at no expected cost. "Within noise" is read on the nested OOF rows:
P(it beats the other on a drawn private part) below :data:`NOISE`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kit.metrics import format_ci, get_metric
from kit.submission.ledger import ON_KAGGLE, build_ledger
from kit.submission.package import load_manifest
from kit.submission.shakeup import (
    N_DRAWS,
    SEED,
    metric_score,
    nested_oof_path,
    p_beats,
    public_fraction_of,
    read_nested_oof,
)
from kit.task import default_task
from kit.utils import KitError

NOISE = 0.8  # P(A beats B) below this: A and B are within noise of each other
UNUSABLE = ("error",)  # Kaggle could not score it (a failed upload can still be retried)


class Pick:
    """One ledger row as ``choose`` reads it."""

    def __init__(self, row: dict):
        self.row = row
        self.manifest = Path(row["manifest"])
        self.name = Path(row["file"]).stem
        # Runs are the same when their files are (run_hashes), else when their names are.
        hashes, names = _str(row["run_hashes"]), _str(row["runs"])
        self.runs = frozenset(filter(None, hashes.split(";") if hashes else names.split("+")))

    def estimate_text(self) -> str:
        r = self.row
        lo, hi = r["estimate_lo"], r["estimate_hi"]
        ci = None if _nan(lo) or _nan(hi) else (lo, hi)
        return format_ci(r["estimate"], ci)

    def basis_text(self) -> str:
        r = self.row
        exp = format_ci(r["expected"], None if _nan(r["expected_lo"])
                        else (r["expected_lo"], r["expected_hi"]))
        if r["estimate_basis"] == "private":
            return f"private score {r['private_score']:.4f}"
        if r["estimate_basis"] == "nested+public":
            return f"nested {exp} with public {r['public_score']:.4f}"
        return f"nested {exp}, no public score yet"


def _nan(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v))


def _str(v) -> str:
    return "" if _nan(v) else str(v)


def candidates(df) -> tuple[list[Pick], list[str]]:
    """Rows that can be selected, best first, one per CSV content; and notes on the rest."""
    picks, notes, seen = [], [], {}
    for row in df.to_dict("records"):
        pick = Pick(row)
        if row["status"] in UNUSABLE:
            notes.append(f"{pick.name}: left out, its upload status is {row['status']}")
        elif _nan(row["estimate"]):
            notes.append(f"{pick.name}: left out, its manifest holds no expected score")
        elif row["sha256"] in seen:
            notes.append(f"{pick.name}: the same CSV as {seen[row['sha256']]}, counted once")
        else:
            seen[row["sha256"]] = pick.name
            picks.append(pick)
    return picks, notes


class Pairing:
    """P(A beats B) on drawn private parts of the nested OOF rows both submissions share."""

    def __init__(self, task, n_test: int, public_fraction: float, n_draws: int, seed):
        self.task, self.n_test, self.fraction = task, n_test, public_fraction
        self.n_draws, self.seed = n_draws, seed
        self.cache: dict[Path, object] = {}

    def rows(self, pick: Pick):
        if pick.manifest not in self.cache:
            path = nested_oof_path(pick.manifest.with_name(pick.row["file"]))
            self.cache[pick.manifest] = (read_nested_oof(path, self.task.classes)
                                         if path.is_file() else None)
        return self.cache[pick.manifest]

    def p_beats(self, a: Pick, b: Pick) -> tuple[float | None, str | None]:
        """``(P(a beats b), None)``, or ``(None, why it cannot be told)``."""
        ra, rb = self.rows(a), self.rows(b)
        lacking = [p.name for p, r in ((a, ra), (b, rb)) if r is None]
        if lacking:
            return None, (f"no nested OOF file for {' and '.join(lacking)} (blends before the "
                          "kit wrote submissions/<stem>.oof.csv)")
        shared = ra.index.intersection(rb.index)
        if len(shared) == 0:
            return None, f"{a.name} and {b.name} share no OOF images"
        ra, rb = ra.loc[shared], rb.loc[shared]
        if (ra.y.to_numpy() != rb.y.to_numpy()).any():
            return None, f"{a.name} and {b.name} were scored against different labels"
        metric = a.row["metric"] or self.task.metric
        score = metric_score(get_metric(metric).name, len(self.task.classes))
        p = p_beats(ra.y.to_numpy(), ra.pred.to_numpy(), rb.pred.to_numpy(), score,
                    self.n_test, self.fraction, self.n_draws, self.seed)
        return p, None


def choose(paths, task=None, n_draws: int = N_DRAWS, seed=SEED, noise: float = NOISE) -> dict:
    """The two submissions to select, and why.

    Returns
    -------
    dict
        ``picks`` (one or two ledger rows), ``why`` (one line per pick), ``p_first_beats``
        (P(first beats second) on the private part, None when it cannot be told), ``notes``,
        ``n_test``, ``public_fraction`` and its ``fraction_source``.

    Raises
    ------
    KitError
        No submission that can be selected.
    """
    task = task or default_task()
    df = build_ledger(paths, task)
    picks, notes = candidates(df)
    if not picks:
        raise KitError(f"no submission to choose from in {paths.submissions_dir}"
                       + (f" ({'; '.join(notes)})" if notes else "")
                       + "; ./run.sh blend writes one")
    first = picks[0]
    manifest = load_manifest(first.manifest)
    shake = manifest.get("shakeup") or {}
    fraction, source = ((shake["public_fraction"], shake.get("public_fraction_source", "task"))
                        if shake.get("public_fraction") else public_fraction_of(task))
    n_test = int(shake.get("n_test") or manifest["data"]["n_test"])
    pairing = Pairing(task, n_test, fraction, n_draws, seed)
    out = {"picks": [first.row], "why": ["the highest estimated private score"],
           "p_first_beats": None,
           "notes": notes, "n_test": n_test, "public_fraction": fraction,
           "fraction_source": source}
    if len(picks) == 1:
        out["notes"].append("only one submission can be selected: blend another (other runs "
                            "are the better hedge) for a second pick")
        return _pick_notes(out, [first])
    second, why = picks[1], "the best of the rest by estimated private score"
    if second.runs == first.runs:
        other = next((p for p in picks[2:] if p.runs != first.runs), None)
        if other is None:
            why += "; every other submission is built from the same runs"
        else:
            p, unknown = pairing.p_beats(second, other)
            if unknown:
                out["notes"].append(f"could not tell whether {other.name} (other runs) is "
                                    f"within noise of {second.name}: {unknown}")
            elif p < noise:
                why = (f"other runs than the first, within noise of {second.name} (same runs "
                       f"as the first; P({second.name} beats it) = {p:.2f} < {noise:.2f})")
                second = other
            else:
                why += (f"; {other.name} (other runs) is below it beyond noise "
                        f"(P = {p:.2f} >= {noise:.2f})")
    out["picks"].append(second.row)
    out["why"].append(why)
    p, unknown = pairing.p_beats(first, second)
    out["p_first_beats"] = p
    if unknown:
        out["notes"].append(f"P(first beats second) unknown: {unknown}")
    return _pick_notes(out, [first, second])


def _pick_notes(out: dict, picks: list[Pick]) -> dict:
    """Add what the user must know of each pick: an optimistic score, not on Kaggle yet."""
    for pick in picks:
        if pick.row["expected_label"] == "optimistic":
            out["notes"].append(f"{pick.name}: its expected score is OPTIMISTIC (an input chose "
                                "something on its own OOF rows)")
        if _str(pick.row["status"]) not in ON_KAGGLE:
            out["notes"].append(f"{pick.name}: not on Kaggle yet: ./run.sh submit "
                                f"{pick.manifest.with_name(pick.row['file'])} -m ...")
    return out


def report_lines(result: dict) -> list[str]:
    """What ``./run.sh choose`` prints."""
    assumed = " (assumed)" if result["fraction_source"] == "assumed" else ""
    lines = [f"select for the private leaderboard ({result['n_test']} test images, public "
             f"fraction {result['public_fraction']:.2f}{assumed}):"]
    for i, (row, why) in enumerate(zip(result["picks"], result["why"]), start=1):
        pick = Pick(row)
        lines.append(f"  {i}. {row['file']}  est. private {pick.estimate_text()}  "
                     f"[{pick.basis_text()}; runs {row['runs'] or '-'}]")
        lines.append(f"     why: {why}")
    p = result["p_first_beats"]
    if p is not None:
        lines.append(f"P(1 beats 2 on the private part) = {p:.2f} (paired, on drawn private "
                     "parts of the nested OOF rows)")
    lines += [f"note: {n}" for n in result["notes"]]
    return lines
