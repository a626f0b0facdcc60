"""The ledger of submissions: ``submissions/ledger.csv``, one row per packaged submission.

Every row is built from a manifest (``submissions/<stem>.json`` beside its CSV) and its upload
records, so the file can always be rebuilt (:func:`write_ledger`) and is never edited by hand.
Each row carries the nested expected score and its interval, the shake-up spread, the
leaderboard scores once known, and the private score expected from all of them
(:func:`estimate`), by which the rows are sorted, best first.

Columns (:data:`COLUMNS`): ``time`` (the blend's, UTC), ``file`` (the CSV), ``sha256`` (of the
CSV), ``runs`` (backbones, ``+``-joined), ``run_hashes`` (``backbone:hash;...``, a hash of the
run files the blend read), ``metric``, ``expected`` with ``expected_lo``/``expected_hi`` (the
nested score and its 95 % interval) and ``expected_label`` (``expected`` | ``optimistic``),
``sd_public_minus_private`` (the shake-up), ``public_score``, ``private_score``, ``estimate``
with ``estimate_lo``/``estimate_hi`` and ``estimate_basis`` (``private`` | ``nested+public`` |
``nested``), then the upload record's ``competition``, ``ref``, ``status`` and ``submitted``
(its time), and ``oof`` (the nested OOF file, when there is one).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from kit.log import LOGGER
from kit.metrics import format_ci
from kit.submission import package
from kit.submission.shakeup import (
    nested_oof_path,
    private_estimate,
    public_fraction_of,
    read_nested_oof,
    shakeup_record,
)
from kit.task import default_task
from kit.utils import KitError, atomic_write_csv, sha256_text

LEDGER = "ledger.csv"
COLUMNS = ("time", "file", "sha256", "runs", "run_hashes", "metric", "expected", "expected_lo",
           "expected_hi", "expected_label", "sd_public_minus_private", "public_score",
           "private_score", "estimate", "estimate_lo", "estimate_hi", "estimate_basis",
           "competition", "ref", "status", "submitted", "oof")
SE_PER_CI95 = 2 * 1.959964  # a 95 % interval's width in standard errors
ON_KAGGLE = ("submitted", "complete", "pending", "timeout")  # an upload Kaggle accepted


def ledger_path(paths) -> Path:
    return paths.submissions_dir / LEDGER


def manifest_paths(paths) -> list[Path]:
    """Every manifest in ``submissions/``, oldest first; ``latest.json`` (a copy) and the
    ``<name>.submissions.json`` logs of CSVs without a manifest left out."""
    folder = paths.submissions_dir
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if p.name != f"{package.LATEST}.json"
                  and not p.name.endswith(".submissions.json"))


def load_manifests(paths, task=None) -> list[tuple[Path, dict]]:
    """``(path, manifest)`` of every readable manifest of the task's classes; any other is
    skipped with a warning naming it (one broken file must not hide the others)."""
    classes = set((task or default_task()).classes)
    out = []
    for path in manifest_paths(paths):
        try:
            manifest = package.load_manifest(path)
            biases = manifest["blend"].get("biases")
            # The set, not the order: manifests are written with sorted keys.
            if isinstance(biases, dict) and set(biases) != classes:
                raise KitError(f"{path}: a blend for classes {', '.join(map(str, biases))}, "
                               "not the task's; pass --task for its competition")
        except KitError as exc:
            LOGGER.warning(f"warning: skipped {exc}")
            continue
        named = manifest["files"].get("manifest")
        if named != path.name:
            LOGGER.warning(f"warning: skipped {path}: a copy of {named} (its files.manifest "
                           "names another file); delete it")
            continue
        out.append((path, manifest))
    return out


# ----------------------------------------------------------------------------- one row

def runs_of(manifest: dict) -> dict[str, str]:
    """Backbone -> a short hash of its run's files as the blend read them (``inputs`` under
    ``runs/<backbone>/``); empty when the manifest recorded none."""
    out = {}
    for bb in manifest.get("blend", {}).get("backbones") or sorted(manifest.get("backbones", {})):
        files = {k: v for k, v in manifest.get("inputs", {}).items()
                 if k.startswith(f"runs/{bb}/")}
        out[bb] = sha256_text(json.dumps(files, sort_keys=True))[:12] if files else ""
    return out


def upload_record(manifest: dict) -> dict | None:
    """The upload record that stands for the submission on Kaggle: the newest with a private
    score, else with a public score, else the newest Kaggle accepted, else the newest."""
    records = [r for r in manifest.get("submissions", []) if isinstance(r, dict)]
    for keep in (lambda r: r.get("private_score") is not None,
                 lambda r: r.get("public_score") is not None,
                 lambda r: r.get("status") in ON_KAGGLE, lambda r: True):
        chosen = [r for r in records if keep(r)]
        if chosen:
            return chosen[-1]
    return None


def expected_of(manifest: dict) -> tuple[str, float | None, list | None, str | None]:
    """``(metric, nested expected score, its 95 % interval, label)``, read from the manifest's
    ``expected_score`` (else ``scores.nested``) whatever the metric's key is called."""
    exp = manifest.get("expected_score") or {}
    nested = manifest.get("scores", {}).get("nested") or {}
    metric = (exp.get("metric") or manifest.get("metric")
              or (manifest.get("shakeup") or {}).get("metric")
              or (manifest.get("task") or {}).get("metric") or "macro_f1")
    value = next((d[k] for d in (exp, nested) for k in ("score", metric, "macro_f1")
                  if isinstance(d.get(k), (int, float))), None)
    ci = manifest.get("expected_ci95") or nested.get("ci95")
    label = exp.get("label") or ("expected" if value is not None else None)
    return metric, value, (list(ci) if ci else None), label


def spread_of(path: Path, manifest: dict, task) -> dict | None:
    """The manifest's ``shakeup`` record, else one computed from its nested OOF file (blends
    whose manifest predates the record), else None."""
    if manifest.get("shakeup"):
        return manifest["shakeup"]
    oof = nested_oof_path(path.with_name(manifest["files"]["csv"]))
    if not oof.is_file():
        return None
    rows = read_nested_oof(oof, task.classes)
    fraction, source = public_fraction_of(task)
    record = shakeup_record(rows.y.to_numpy(), rows.pred.to_numpy(), expected_of(manifest)[0],
                            task.classes, manifest["data"]["n_test"],
                            fraction if source == "task" else None)
    return record


def estimate(expected: float | None, ci: list | None, public: float | None,
             private: float | None, spread: dict | None) -> dict:
    """The private score expected for a submission, and on what it rests.

    The private score itself once known (``basis`` ``private``); else the nested score and the
    public score, each weighted by its precision (:func:`kit.submission.shakeup.private_estimate`;
    ``nested+public``); else the nested score alone, its interval widened by the private part's
    own sampling spread when the shake-up is known (``nested``). The standard error of the
    nested score is the shake-up record's ``expected_se``, else its interval's width / 3.92.
    """
    if private is not None:
        return {"estimate": private, "lo": None, "hi": None, "basis": "private"}
    if expected is None:
        return {"estimate": public, "lo": None, "hi": None,
                "basis": "public" if public is not None else None}
    se = (spread or {}).get("expected_se")
    if se is None and ci:
        se = (ci[1] - ci[0]) / SE_PER_CI95
    if spread is None or se is None:
        lo, hi = ci if ci else (None, None)
        return {"estimate": expected, "lo": lo, "hi": hi, "basis": "nested"}
    est = private_estimate(expected, se, public, spread)
    return {"estimate": est["estimate"], "lo": est["ci"][0], "hi": est["ci"][1],
            "basis": "nested" if public is None else "nested+public"}


def ledger_row(path: Path, manifest: dict, task) -> dict:
    """One row of the ledger (the keys of :data:`COLUMNS`, plus ``manifest``: its path)."""
    metric, expected, ci, label = expected_of(manifest)
    record = upload_record(manifest) or {}
    spread = spread_of(path, manifest, task)
    public, private = record.get("public_score"), record.get("private_score")
    est = estimate(expected, ci, public, private, spread)
    runs = runs_of(manifest)
    oof = nested_oof_path(path.with_name(manifest["files"]["csv"]))
    return {
        "time": manifest["created_utc"], "file": manifest["files"]["csv"],
        "sha256": manifest["csv_sha256"], "runs": "+".join(runs),
        "run_hashes": ";".join(f"{bb}:{h}" for bb, h in runs.items() if h),
        "metric": metric, "expected": expected,
        "expected_lo": ci[0] if ci else None, "expected_hi": ci[1] if ci else None,
        "expected_label": label,
        "sd_public_minus_private": (spread or {}).get("sd_public_minus_private"),
        "public_score": public, "private_score": private,
        "estimate": est["estimate"], "estimate_lo": est["lo"], "estimate_hi": est["hi"],
        "estimate_basis": est["basis"],
        "competition": record.get("competition") or manifest.get("competition"),
        "ref": record.get("ref"), "status": record.get("status"),
        "submitted": record.get("time"), "oof": oof.name if oof.is_file() else None,
        "manifest": str(path),
    }


# ----------------------------------------------------------------------------- the ledger

def build_ledger(paths, task=None, manifests=None) -> pd.DataFrame:
    """Every manifest's row, best first by estimated private score (unknown last, then
    newest first); ``manifest`` holds each row's manifest path. ``manifests``: as
    :func:`load_manifests` returns them (default: read now)."""
    task = task or default_task()
    if manifests is None:
        manifests = load_manifests(paths, task)
    rows = [ledger_row(p, m, task) for p, m in manifests]
    df = pd.DataFrame(rows, columns=[*COLUMNS, "manifest"])
    if df.empty:
        return df
    df["ref"] = df["ref"].astype("Int64")
    df = df.sort_values("time", ascending=False, kind="stable")
    df = df.sort_values("estimate", ascending=False, kind="stable", na_position="last")
    return df.reset_index(drop=True)


def write_ledger(paths, task=None, manifests=None) -> tuple[Path, pd.DataFrame]:
    """Rebuild ``submissions/ledger.csv`` from the manifests, atomically; return it too."""
    df = build_ledger(paths, task, manifests)
    path = atomic_write_csv(ledger_path(paths), df.loc[:, list(COLUMNS)], float_format="%.6g")
    return path, df


def format_table(df: pd.DataFrame) -> str:
    """The ledger as aligned text lines, best first."""
    head = ("#", "file", "runs", "expected", "public", "private", "est. private", "basis",
            "status")
    lines = [head]
    for i, r in enumerate(df.itertuples(index=False), start=1):
        lines.append((str(i), Path(r.file).stem, r.runs or "-",
                      _score_ci(r.expected, r.expected_lo, r.expected_hi)
                      + (" OPTIMISTIC" if r.expected_label == "optimistic" else ""),
                      _num(r.public_score), _num(r.private_score),
                      _score_ci(r.estimate, r.estimate_lo, r.estimate_hi),
                      _text(r.estimate_basis), _status(r)))
    widths = [max(len(row[j]) for row in lines) for j in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in lines)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def _num(v) -> str:
    return "-" if _missing(v) else f"{float(v):.4f}"


def _text(v) -> str:
    return "-" if _missing(v) else str(v)


def _score_ci(v, lo, hi) -> str:
    if _missing(v):
        return "-"
    return format_ci(float(v), None if _missing(lo) or _missing(hi) else (float(lo), float(hi)))


def _status(r) -> str:
    if _missing(r.status):
        return "not submitted"
    return f"{r.status} (ref {r.ref})" if not _missing(r.ref) else str(r.status)
