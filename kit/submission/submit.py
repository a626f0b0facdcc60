"""Upload a submission file to Kaggle and record the upload in its manifest.

The CSV is checked as ``./run.sh blend`` checked it, the credentials are found before the
client runs (:mod:`kit.submission.credentials`), and the upload goes through the kaggle
client's Python API behind a gate that turns its failures into one scrubbed line
(:mod:`kit.submission.kaggle_client`).

The CSV is never touched; each upload, failed or not, is appended to the ``submissions``
list of its manifest (``submissions/<name>.json``).
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from kit import CLASSES
from kit.config import given
from kit.metrics import format_ci
from kit.paths import Paths
from kit.submission import package
from kit.submission.credentials import find_credentials
from kit.submission.kaggle_client import KaggleSession
from kit.utils import KitError, atomic_write_json, sha256_file


# ----------------------------------------------------------------------------- the CSV

def resolve_submission(paths: Paths, csv=None) -> tuple[Path, dict | None, Path]:
    """The CSV to upload, its manifest (None if it has none) and where records go.

    A CSV written by ``./run.sh blend`` has ``<same name>.json`` beside it; records of any
    other CSV go to ``<name>.submissions.json``.
    """
    csv_path = Path(csv) if csv else paths.submissions_dir / f"{package.LATEST}.csv"
    if not csv_path.is_file():
        hint = "; run ./run.sh blend first" if csv is None else ""
        raise KitError(f"{csv_path}: submission file not found{hint}")
    manifest_path = csv_path.with_suffix(".json")
    if manifest_path.is_file():
        manifest = package.load_manifest(manifest_path)
        if manifest.get("csv_sha256") != sha256_file(csv_path):
            raise KitError(f"{csv_path}: changed since ./run.sh blend wrote it (sha256 differs "
                           f"from {manifest_path.name}); rerun ./run.sh blend, or submit a copy "
                           "under another name with --data")
        return csv_path, manifest, manifest_path
    return csv_path, None, csv_path.with_suffix(".submissions.json")


def check_submission(csv_path: Path, manifest: dict | None, data=None) -> int:
    """Validate the CSV as ``./run.sh blend`` did; return its row count.

    The expected test ids come from ``<data>/test_data/`` when it exists, else from the
    manifest's hash of the sorted test file list (the CSV's own ids must hash to it).
    """
    test_dir = Path(data) / "test_data" if data else None
    if test_dir is not None and test_dir.is_dir():
        expected = package.expected_test_ids(test_dir)
        source = str(test_dir)
    elif manifest is not None:
        expected = _ids_matching_manifest(csv_path, manifest)
        source = "the test set recorded in the manifest"
    else:
        raise KitError(f"{csv_path}: cannot check its rows without the test set: pass --data "
                       "<dataset root with test_data/>, or submit a CSV written by ./run.sh blend")
    problems = package.validate_submission(csv_path, expected, CLASSES)
    if problems:
        raise KitError(f"{csv_path}: not uploaded, {len(problems)} problems against {source}",
                       problems)
    return len(expected)


def _ids_matching_manifest(csv_path: Path, manifest: dict) -> list[str]:
    try:
        ids = pd.read_csv(csv_path, dtype=str, keep_default_na=False).iloc[:, 0]
    except (ValueError, IndexError, pd.errors.ParserError) as exc:
        raise KitError(f"{csv_path}: not a readable CSV ({exc})")
    ids = sorted(set(i for i in ids if i))
    recorded = manifest["data"]
    if package.test_files_sha256(ids) != recorded["test_files_sha256"]:
        raise KitError(f"{csv_path}: its {len(ids)} sample_index values are not the "
                       f"{recorded['n_test']} test images the blend saw; pass --data to list "
                       "the differences")
    return ids


# ----------------------------------------------------------------------------- records

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record_submission(record_path: Path, record: dict, is_manifest: bool,
                      update: bool = False) -> None:
    """Append ``record`` (or, with ``update``, merge it into the one with the same ``id``).

    ``is_manifest``: ``record_path`` is a blend manifest (edited through
    ``kit.submission.package.modify_manifest``, which keeps ``latest.json`` in step); otherwise
    it is the small log of a CSV that has no manifest.
    """

    def change(manifest):
        subs = manifest.setdefault("submissions", [])
        if update:
            for old in subs:
                if old.get("id") == record["id"]:
                    old.update(record)
                    return
        subs.append(record)

    if is_manifest:
        package.modify_manifest(record_path, change)
        return
    log = (json.loads(record_path.read_text()) if record_path.is_file()
           else {"csv": record["csv"], "submissions": []})
    change(log)
    atomic_write_json(record_path, log)


# ----------------------------------------------------------------------------- the stage

def run_submit(paths: Paths, data, cfg: dict, *, message: str, csv=None,
               competition: str | None = None, wait: bool = False, dry_run: bool = False,
               env=None, echo=print) -> dict:
    """Validate, upload and record one submission; return its record.

    Parameters
    ----------
    paths : Paths
        Work directory (``submissions/latest.csv`` is the default CSV).
    data : path or None
        Dataset root; its ``test_data/`` gives the expected rows when present, else the
        manifest's record of the test set does (None: no dataset at hand).
    cfg : dict
        The resolved ``submit`` config.
    message : str
        The submission description shown on Kaggle.
    csv : path, optional
        The file to upload (default ``submissions/latest.csv``).
    competition : str, optional
        Slug; default the manifest's ``competition``, else ``kit/conf/submit.yaml``.
    wait : bool
        Poll until scored and print the public score beside the nested CV estimate.
    dry_run : bool
        Every check, no upload and no record.

    Raises
    ------
    KitError
        Bad CSV, no or unsafe credentials, or Kaggle refusing the upload (recorded).
    """
    cfg = given(cfg, "submit")
    if not message or not message.strip():
        raise KitError("a submission message is required: -m 'what changed'")
    csv_path, manifest, record_path = resolve_submission(paths, csv)
    competition = competition or (manifest or {}).get("competition") or cfg["competition"]
    n_rows = check_submission(csv_path, manifest, data)
    echo(f"{csv_path}: {n_rows} rows valid")
    if dry_run:
        creds = find_credentials(env)
        echo(f"dry run: credentials from {creds.source}; would upload to {competition} with "
             f"message {message!r}; nothing sent")
        return {"competition": competition, "message": message, "status": "dry-run"}

    # From here on every outcome is recorded, a failure included.
    record = {"id": f"{_now()}#{os.getpid()}", "time": _now(), "competition": competition,
              "message": message, "csv": (manifest or {}).get("files", {}).get("csv", csv_path.name),
              "csv_sha256": sha256_file(csv_path),
              "status": "uploading"}
    try:
        creds = find_credentials(env)
        echo(f"uploading to {competition} (credentials from {creds.source})")
        session = KaggleSession(creds, competition)
        record.update(session.submit(csv_path, message), status="submitted")
    except KitError as exc:
        record.update(status="failed", error=str(exc))
        record_submission(record_path, record, manifest is not None)
        raise KitError(f"{exc} (the CSV is kept; failure recorded in {record_path.name})",
                       exc.problems) from None
    record_submission(record_path, record, manifest is not None)
    echo(f"submitted to {competition}: ref {record['ref']} ({record['kaggle_message']}); "
         f"recorded in {record_path}")
    if wait:
        record.update(wait_for_score(session, record, cfg, echo))
        record_submission(record_path, record, manifest is not None, update=True)
        _report_score(record, manifest, echo)
        if record["status"] != "complete":
            raise KitError(_unscored_reason(record, competition))
    return record


def wait_for_score(session: KaggleSession, record: dict, cfg: dict, echo=print) -> dict:
    """Poll the submission list until this one is scored, errors or the time-out passes."""
    interval, deadline = float(cfg["poll_interval"]), time.monotonic() + float(cfg["wait_timeout"])
    last = None
    while True:
        state = session.status(record.get("ref"), record["message"])
        if state is not None:
            if state["status"] != last:
                echo(f"status: {state['status']}")
                last = state["status"]
            if state["status"] in ("complete", "error"):
                return {k: v for k, v in state.items() if v is not None}
        if time.monotonic() + interval > deadline:
            return {"status": "timeout"}
        time.sleep(interval)


def _report_score(record: dict, manifest: dict | None, echo) -> None:
    if record.get("public_score") is None:
        return
    scores = (manifest or {}).get("scores", {})
    nested = scores.get("nested", {}).get("macro_f1")
    in_sample = scores.get("in_sample", {}).get("macro_f1")
    line = f"public score {record['public_score']:.4f}"
    if nested is not None:
        optimistic = ((manifest or {}).get("expected_score") or {}).get("honest") is False
        what = ("OPTIMISTIC: an input chose something on its own OOF rows" if optimistic
                else "the kit's estimate")
        ci = (manifest or {}).get("expected_ci95") or scores.get("nested", {}).get("ci95")
        line += f" | nested CV macro F1 {format_ci(nested, ci)} ({what})"
    if in_sample is not None:
        line += f" | in-sample {in_sample:.4f}"
    echo(line)


def _unscored_reason(record: dict, competition: str) -> str:
    if record["status"] == "error":
        return (f"Kaggle could not score submission {record.get('ref')}: "
                f"{record.get('error') or 'no reason given'}")
    return (f"submission {record.get('ref')} not scored before the time-out; it stands: see "
            f"./run.sh kaggle competitions submissions -c {competition}")
