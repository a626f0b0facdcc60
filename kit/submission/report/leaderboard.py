"""The report's ledger of submissions: one row per packaged submission, newest first, the two
``./run.sh choose`` would select and why, and each public score plotted against the nested
expected score."""
from __future__ import annotations

import logging
import math

from kit.metrics import get_metric
from kit.paths import Paths
from kit.submission.choose import Pick, choose
from kit.submission.ledger import build_ledger, load_manifests
from kit.submission.report.layout import (
    READ_ERRORS,
    Bold,
    figure_png,
    inline_image,
    make_table,
    pyplot,
    score_ci,
)
from kit.submission.shakeup import public_fraction_of
from kit.task import Task, task_of

log = logging.getLogger(__name__)

Z95 = 1.959964
REFRESH = "./run.sh submissions --refresh"
NAME_CHARS = 28  # a point's label: longer file names are cut, the table has them whole


def _num(v) -> float | None:
    """A ledger cell as a float; None for a missing one (None, NaN, pd.NA)."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def ledger_part(paths: Paths, task: Task | None = None) -> dict:
    """The ledger table, the picks of ``choose`` and the plot, for ``report/submissions.html``.

    A ledger that cannot be built (a broken nested OOF file, a manifest of an older kit) gives
    ``error``, its reason, so the section still lists the files and uploads; a ``choose`` that
    cannot pick gives ``choose_error`` beside the table.
    """
    out = {"error": None, "table": None, "picks": None, "p_first_beats": None, "notes": [],
           "choose_error": None, "plot": None, "plot_notes": [], "refresh": None}
    task = task_of(None) if task is None else task
    try:
        manifests = load_manifests(paths, task)
        df = build_ledger(paths, task, manifests)
    except READ_ERRORS as exc:
        log.warning(f"report: the ledger could not be built: {exc}")
        return {**out, "error": str(exc)}
    if df.empty:
        return out
    df = df.sort_values("time", ascending=False, kind="stable").reset_index(drop=True)
    out["table"] = ledger_table(df)
    try:
        result = choose(paths, task)
    except READ_ERRORS as exc:  # e.g. no row with an expected score: the table still shows
        out["choose_error"] = str(exc)
    else:
        out.update(picks=picks_table(result), p_first_beats=result["p_first_beats"],
                   notes=result["notes"])
    points = plot_points(df, {str(p): m for p, m in manifests}, task)
    if not points:
        out["refresh"] = REFRESH
        return out
    missing = int(df["public_score"].map(_num).notna().sum()) - len(points)
    if missing:
        out["plot_notes"].append(f"{missing} submission(s) with a public score but no nested "
                                 "expected score are not plotted")
    if any(p["y_sd"] is None for p in points):
        out["plot_notes"].append("no vertical bar: the manifest records no shake-up (a blend "
                                 "before the kit kept one, and no nested OOF file)")
    png = public_vs_expected_png(points, get_metric(task.metric).title)
    out["plot"] = inline_image(png, alt="public score against the nested expected score")
    return out


def ledger_table(df) -> dict:
    """One row per submission, in the order of ``df``; the estimated private score only once
    a public score moves it off the nested score (its basis ``nested+public``)."""
    rows = []
    for r in df.to_dict("records"):
        expected = score_ci(_num(r["expected"]), [r["expected_lo"], r["expected_hi"]])
        if r["expected_label"] == "optimistic" and expected is not None:
            expected = Bold(f"{expected} optimistic", "warn")
        est = (score_ci(_num(r["estimate"]), [r["estimate_lo"], r["estimate_hi"]])
               if r["estimate_basis"] == "nested+public" else None)
        rows.append([str(r["time"])[:16].replace("T", " "), r["file"], r["runs"] or None,
                     expected, _num(r["public_score"]), est, _num(r["private_score"])])
    return make_table(["time (UTC)", "file", "runs", "nested expected [95%]", "public score",
                       "est. private [95%]", "private score"], rows, "num")


def picks_table(result: dict) -> dict:
    """``choose``'s picks, each with its estimate, what it rests on and its one-line reason."""
    rows = []
    for i, (row, why) in enumerate(zip(result["picks"], result["why"]), start=1):
        pick = Pick(row)
        rows.append([i, row["file"], pick.estimate_text(), pick.basis_text(), why])
    return make_table(["pick", "file", "est. private [95%]", "from", "why"], rows, "num")


def public_sd(row: dict, manifest: dict, task: Task) -> float | None:
    """The sampling spread of the submission's public score: the vertical bar is ± 1.96 x it.

    The shake-up record's ``sd_public``: the spread of the score on a public part
    (``n_test`` x ``public_fraction`` images) drawn from the nested OOF rows, i.e. how far a
    public score falls from the submission's true score by the draw of images alone. Against
    x (the nested estimate of that true score) this is the spread that says whether a point's
    distance from the diagonal is chance. Not ``sd_public_minus_private``: the spread of the
    gap between the two parts adds the private part's own spread (1 / sqrt(1 - f) wider,
    about 1.2 x at f = 0.3). A record without ``sd_public`` (or a spread computed by the
    ledger from the nested OOF file) gives ``sd_public_minus_private`` x sqrt(1 - f): with
    parts drawn independently, var(public) = s^2 / (n f) and var(public - private) =
    s^2 / (n f (1 - f)).
    """
    shake = manifest.get("shakeup") or {}
    sd = _num(shake.get("sd_public"))
    if sd is not None:
        return sd
    gap = _num(shake.get("sd_public_minus_private")) or _num(row["sd_public_minus_private"])
    if gap is None:
        return None
    fraction = _num(shake.get("public_fraction")) or public_fraction_of(task)[0]
    return gap * math.sqrt(1 - fraction)


def plot_points(df, manifests: dict, task: Task) -> list[dict]:
    """Every submission with a public and a nested expected score: ``name``, ``x`` with
    ``x_lo``/``x_hi`` (its 95 % interval, None when unrecorded), ``y`` (the public score),
    ``y_sd`` (:func:`public_sd`) and ``private`` (None until the competition ends)."""
    points = []
    for r in df.to_dict("records"):
        x, y = _num(r["expected"]), _num(r["public_score"])
        if x is None or y is None:
            continue
        stem = r["file"].rsplit(".", 1)[0]
        name = stem if len(stem) <= NAME_CHARS else stem[:NAME_CHARS - 1] + "…"
        points.append({"name": name, "x": x, "x_lo": _num(r["expected_lo"]),
                       "x_hi": _num(r["expected_hi"]), "y": y,
                       "y_sd": public_sd(r, manifests.get(r["manifest"], {}), task),
                       "private": _num(r["private_score"])})
    return points


def public_vs_expected_png(points: list[dict], title: str) -> bytes:
    """Public (and private, once known) against the nested expected score, with the y = x
    diagonal: a point whose bars miss the diagonal is further off than chance explains."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 6))
    seen = set()
    for p in points:
        xerr = ([[p["x"] - p["x_lo"]], [p["x_hi"] - p["x"]]]
                if p["x_lo"] is not None and p["x_hi"] is not None else None)
        yerr = Z95 * p["y_sd"] if p["y_sd"] is not None else None
        label = None if "public" in seen else "public score (± 1.96 sd of a public part)"
        ax.errorbar(p["x"], p["y"], xerr=xerr, yerr=yerr, fmt="o", color="C0", ecolor="#8ab",
                    capsize=3, label=label)
        seen.add("public")
        if p["private"] is not None:
            label = None if "private" in seen else "private score"
            ax.plot([p["x"], p["x"]], [p["y"], p["private"]], ls=":", color="#c84", lw=1)
            ax.plot(p["x"], p["private"], marker="D", color="C1", ls="none", label=label)
            seen.add("private")
        ax.annotate(p["name"], (p["x"], p["y"]), xytext=(5, 5), textcoords="offset points",
                    fontsize=8)
    lo, hi = _limits(points)
    ax.plot([lo, hi], [lo, hi], ls="--", color="#888", lw=1, label="y = x")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(f"nested expected {title} [95% interval]")
    ax.set_ylabel(f"leaderboard {title}")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Leaderboard against the nested expected score", fontsize=11)
    fig.tight_layout()
    return figure_png(fig)


def _limits(points: list[dict]) -> tuple[float, float]:
    """One range for both axes (the diagonal at 45 degrees), every bar and marker inside."""
    values = []
    for p in points:
        values += [p["x"], p["y"]] + [v for v in (p["x_lo"], p["x_hi"], p["private"])
                                      if v is not None]
        if p["y_sd"] is not None:
            values += [p["y"] - Z95 * p["y_sd"], p["y"] + Z95 * p["y_sd"]]
    lo, hi = min(values), max(values)
    pad = max(0.05 * (hi - lo), 0.01)
    return lo - pad, hi + pad
