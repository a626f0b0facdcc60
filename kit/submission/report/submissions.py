"""The report's submissions section: the ledger with the two submissions to select and a plot
of public against expected scores (:mod:`kit.submission.report.leaderboard`), every submission
file with its scores, every upload with its public score beside the nested CV estimate."""
from __future__ import annotations

from pathlib import Path

from kit.metrics import get_metric
from kit.paths import Paths
from kit.submission.report.blend import blend_metric, recorded_ci, score
from kit.submission.report.layout import Todo, make_table, read_json, score_ci
from kit.submission.report.leaderboard import ledger_part
from kit.task import Task


def submission_manifests(paths: Paths) -> list[tuple[Path, dict]]:
    """Every manifest and manifest-less upload log under ``submissions/``, newest first."""
    folder = paths.submissions_dir
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json"), reverse=True):
        if path.name == "latest.json":
            continue
        found.append((path, read_json(path)))
    return found


def submissions_section(paths: Paths, task: Task | None = None) -> dict | Todo:
    """The ledger of the task's submissions (:func:`~kit.submission.report.leaderboard.
    ledger_part`), every submission file with its scores (each in its manifest's metric), and
    every upload with its public score."""
    found = submission_manifests(paths)
    if not found:
        return Todo("no submission files", "./run.sh blend, then ./run.sh submit -m MSG")
    latest = paths.submissions_dir / "latest.json"
    latest_name = None
    if latest.is_file():
        latest_name = read_json(latest).get("files", {}).get("manifest")
    rows, uploads = [], []
    for path, m in found:
        scores = m.get("scores", {})
        git = m.get("kit", {}).get("git", {})
        commit = (git.get("commit") or "")[:10] + (" (dirty)" if git.get("dirty") else "")
        csv = m.get("files", {}).get("csv") or m.get("csv", path.stem)
        tag = " ← latest" if path.name == latest_name else ""
        label = (m.get("expected_score") or {}).get("label", "not recorded")
        expected = score_ci(score(scores.get("nested", {})), recorded_ci(m))
        rows.append([csv + tag, m.get("created_utc"), m.get("csv_rows"),
                     get_metric(blend_metric(m)).title if scores else None, expected, label,
                     score(scores.get("in_sample", {})),
                     ", ".join(m.get("backbones", {}) or []), commit or None])
        for rec in m.get("submissions", []):
            uploads.append([rec.get("time"), csv, rec.get("competition"), rec.get("message"),
                            rec.get("status"), rec.get("ref"), rec.get("public_score"),
                            expected, rec.get("error")])
    files = make_table(["file", "created (UTC)", "rows", "metric", "nested score", "nested is",
                        "in-sample score", "backbones", "git commit"], rows, "num")
    ledger = ledger_part(paths, task)
    if not uploads:
        return {"ledger": ledger, "files": files, "uploads": None}
    uploads.sort(key=lambda r: str(r[0]), reverse=True)
    return {"ledger": ledger, "files": files,
            "uploads": make_table(["time (UTC)", "file", "competition", "message", "status", "ref",
                                   "public score", "nested CV estimate", "error"], uploads, "num")}
