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

from kit.config import given
from kit.metrics import format_ci, get_metric
from kit.paths import Paths
from kit.submission import package
from kit.submission.credentials import find_credentials
from kit.submission.kaggle_client import KaggleSession
from kit.submission.ledger import write_ledger
from kit.submission.task_data import manifest_task, test_folder, test_ids
from kit.task import Data, Task, as_data, default_task
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


def submission_task(data, manifest: dict | None, where="manifest") -> Task:
    """The task a submission is checked against: the task of ``data`` when its folder exists
    (refused when the manifest was made for another task), else the manifest's, else the
    task ``data`` names, else the built-in one."""
    recorded = manifest_task(manifest, where) if manifest is not None else None
    data = as_data(data)
    if data is None or not Path(data).is_dir():  # no dataset at hand
        if recorded is not None:
            return recorded
        return data.task if data is not None else default_task()
    if recorded is not None and recorded != data.task:
        raise KitError(f"{where}: made for task {recorded.name} ({recorded.fingerprint[:12]}), "
                       f"not the task of {data} ({data.task.name}, "
                       f"{data.task.fingerprint[:12]}); pass the --data (or --task) it was "
                       "made for")
    return data.task


def check_submission(csv_path: Path, manifest: dict | None, data=None,
                     task: Task | None = None) -> int:
    """Validate the CSV as ``./run.sh blend`` did, against ``task`` (default: the task of
    ``data``, else the built-in one); return its row count.

    The expected test ids are the task's test images under ``data`` when it has them, else
    the manifest's hash of the sorted test ids (the CSV's own ids must hash to it).
    """
    task = task if task is not None else (data.task if isinstance(data, Data) else None)
    task = default_task() if task is None else task
    expected = None
    if data is not None and Path(data).is_dir():
        try:
            expected = test_ids(data, task)
        except KitError:  # no test folder there: the manifest's record decides
            expected = None
    if expected:
        source = f"{Path(data) / test_folder(task)}"
    elif manifest is not None:
        expected = _ids_matching_manifest(csv_path, manifest)
        source = "the test set recorded in the manifest"
    else:
        raise KitError(f"{csv_path}: cannot check its rows without the test set: pass --data "
                       f"<dataset root with {test_folder(task)}>, or submit a CSV "
                       "written by ./run.sh blend")
    problems = package.validate_submission(csv_path, expected, task=task)
    if problems:
        raise KitError(f"{csv_path}: not uploaded, {len(problems)} problems against {source}",
                       problems)
    return len(expected)


def _ids_matching_manifest(csv_path: Path, manifest: dict) -> list[str]:
    try:
        ids = pd.read_csv(csv_path, dtype=str, keep_default_na=False).iloc[:, 0]
    except (ValueError, IndexError, pd.errors.ParserError) as exc:
        raise KitError(f"{csv_path}: not a readable CSV ({exc})") from None
    ids = sorted(set(i for i in ids if i))
    recorded = manifest["data"]
    if package.test_files_sha256(ids) != recorded["test_files_sha256"]:
        raise KitError(f"{csv_path}: its {len(ids)} ids are not the "
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
    data : Data, path or None
        Dataset root and its task; its test images give the expected rows when present, else
        the manifest's record of the test set does (None: no dataset at hand, the manifest's
        task is used).
    cfg : dict
        The resolved ``submit`` config.
    message : str
        The submission description shown on Kaggle.
    csv : path, optional
        The file to upload (default ``submissions/latest.csv``).
    competition : str, optional
        Slug (``-c``); default the manifest's ``competition``, else the task's ``kaggle``,
        else ``competition`` of ``kit/conf/submit.yaml``; none of them: refused.
    wait : bool
        Poll until scored and print the public score beside the nested CV estimate.
    dry_run : bool
        Every check, no upload and no record.

    Raises
    ------
    KitError
        Bad CSV, no competition known, no or unsafe credentials, or Kaggle refusing the
        upload (recorded).
    """
    cfg = given(cfg, "submit")
    if not message or not message.strip():
        raise KitError("a submission message is required: -m 'what changed'")
    csv_path, manifest, record_path = resolve_submission(paths, csv)
    task = submission_task(data, manifest, csv_path.with_suffix(".json"))
    competition = (competition or (manifest or {}).get("competition") or task.kaggle
                   or cfg["competition"])
    if not competition:
        where = f"kaggle: in {task.source}" if task.source else "kaggle: in the task file"
        raise KitError(f"{csv_path}: no Kaggle competition to submit to for task {task.name}; "
                       f"pass -c SLUG, or set {where}, or competition in kit/conf/submit.yaml")
    n_rows = check_submission(csv_path, manifest, data, task)
    echo(f"{csv_path}: {n_rows} rows valid")
    if dry_run:
        creds = find_credentials(env)
        echo(f"dry run: credentials from {creds.source}; would upload to {competition} with "
             f"message {message!r}; nothing sent")
        return {"competition": competition, "message": message, "status": "dry-run"}

    # From here on every outcome is recorded, a failure included.
    record = {"id": f"{_now()}#{os.getpid()}", "time": _now(), "competition": competition,
              "message": message,
              "csv": (manifest or {}).get("files", {}).get("csv", csv_path.name),
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
        write_ledger(paths, task)
        raise KitError(f"{exc} (the CSV is kept; failure recorded in {record_path.name})",
                       exc.problems) from None
    record_submission(record_path, record, manifest is not None)
    write_ledger(paths, task)
    echo(f"submitted to {competition}: ref {record['ref']} ({record['kaggle_message']}); "
         f"recorded in {record_path}")
    if wait:
        record.update(wait_for_score(session, record, cfg, echo))
        record_submission(record_path, record, manifest is not None, update=True)
        write_ledger(paths, task)
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
    nested = _score(scores.get("nested", {}))
    in_sample = _score(scores.get("in_sample", {}))
    title = get_metric((manifest or {}).get("metric") or "macro_f1").title
    line = f"public score {record['public_score']:.4f}"
    if nested is not None:
        optimistic = ((manifest or {}).get("expected_score") or {}).get("honest") is False
        what = ("OPTIMISTIC: an input chose something on its own OOF rows" if optimistic
                else "the kit's estimate")
        ci = (manifest or {}).get("expected_ci95") or scores.get("nested", {}).get("ci95")
        line += f" | nested CV {title} {format_ci(nested, ci)} ({what})"
    if in_sample is not None:
        line += f" | in-sample {in_sample:.4f}"
    echo(line)


def _score(block: dict):
    """A manifest score block's value in its metric (``macro_f1`` in older manifests)."""
    return block.get("score", block.get("macro_f1"))


def _unscored_reason(record: dict, competition: str) -> str:
    if record["status"] == "error":
        return (f"Kaggle could not score submission {record.get('ref')}: "
                f"{record.get('error') or 'no reason given'}")
    return (f"submission {record.get('ref')} not scored before the time-out; it stands: see "
            f"./run.sh kaggle competitions submissions -c {competition}")
