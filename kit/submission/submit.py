"""Upload a submission file to Kaggle and record the upload in its manifest.

Uses the kaggle package's Python API (``KaggleApi.competition_submit``) with the guards the
client lacks:

- ``import kaggle`` authenticates (and prints, or calls the network) at import time, so the
  client module is imported without running the package's ``__init__``;
- ``authenticate()`` exits the process (``SystemExit``) instead of raising, and
  ``competition_submit`` reports some failures in its returned ``message``: both become a
  ``KitError`` with a one-line reason;
- whatever the client prints is captured, and every message is scrubbed of the key or token
  before it reaches the user or a file.

The CSV is never touched; each upload, failed or not, is appended to the ``submissions``
list of its manifest (``submissions/<name>.json``).
"""
from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import os
import stat
import sys
import time
import types
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from kit import CLASSES
from kit.submission import package
from kit.config import given
from kit.metrics import format_ci
from kit.paths import Paths
from kit.utils import KitError, atomic_write_json, sha256_file

SUCCESS_MARK = "Successfully"  # what competition_submit's message says when it worked
MASK = "***"
TOKEN_HELP = "create one at https://www.kaggle.com/settings/api"


# ----------------------------------------------------------------------------- credentials

@dataclass(frozen=True)
class Credentials:
    """Where the client will find its credentials, and the values never to show."""

    source: str
    secrets: tuple[str, ...]


def kaggle_config_dir(env=None) -> Path:
    """The folder holding ``kaggle.json``, found as the kaggle client finds it."""
    env = os.environ if env is None else env
    if env.get("KAGGLE_CONFIG_DIR"):
        return Path(env["KAGGLE_CONFIG_DIR"])
    home = Path(os.path.expanduser("~"))
    legacy = home / ".kaggle"
    if sys.platform.startswith("linux") and not legacy.exists():
        return Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"
    return legacy


def _check_private(path: Path) -> None:
    """Refuse a credential file that other users can read (the client only warns)."""
    if os.name == "nt":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KitError(f"{path}: Kaggle credential file is readable by other users "
                       f"(mode {mode:o}); fix with: chmod 600 {path}")


def _read_token_file(path: Path) -> str | None:
    if not path.is_file():
        return None
    _check_private(path)
    return path.read_text().strip() or None


def find_credentials(env=None) -> Credentials:
    """Check that the kaggle client will find credentials, in the client's own order.

    Access token (``KAGGLE_API_TOKEN``, its value or a file it names, or
    ``~/.kaggle/access_token``), then ``KAGGLE_USERNAME`` + ``KAGGLE_KEY`` over
    ``<config dir>/kaggle.json``, then ``kaggle auth login``'s ``~/.kaggle/credentials.json``.
    Any credential file that exists must be private (mode 600).

    Raises
    ------
    KitError
        No credentials, an unreadable ``kaggle.json``, or a file other users can read.
    """
    env = os.environ if env is None else env
    home = Path(os.path.expanduser("~"))
    secrets: list[str] = []
    found: str | None = None

    token = env.get("KAGGLE_API_TOKEN")
    if token and Path(token).is_file():
        value = _read_token_file(Path(token))
        if value:
            secrets.append(value)
            found = f"token file {token} (KAGGLE_API_TOKEN)"
    elif token:
        secrets.append(token)
        found = "KAGGLE_API_TOKEN"
    for path in (home / ".kaggle" / "access_token", home / ".kaggle" / "access_token.txt"):
        value = _read_token_file(path)
        if value:
            secrets.append(value)
            found = found or str(path)

    config = kaggle_config_dir(env) / "kaggle.json"
    file_values = _read_kaggle_json(config) if config.is_file() else {}
    user = env.get("KAGGLE_USERNAME") or file_values.get("username")
    key = env.get("KAGGLE_KEY") or file_values.get("key")
    for value in (file_values.get("key"), env.get("KAGGLE_KEY")):
        if value:
            secrets.append(str(value))
    if user and key:
        # requests sends the pair as base64 in the Authorization header: mask that form too
        secrets.append(base64.b64encode(f"{user}:{key}".encode()).decode())
        from_env = env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY")
        found = found or ("KAGGLE_USERNAME/KAGGLE_KEY" if from_env else str(config))

    oauth = home / ".kaggle" / "credentials.json"
    if oauth.is_file():
        _check_private(oauth)
        with contextlib.suppress(ValueError, OSError, AttributeError):
            secrets += [str(v) for v in json.loads(oauth.read_text()).values() if v]
        found = found or str(oauth)

    if found is None:
        # ~/.kaggle wins over the XDG folder once it exists, so it is the simplest advice
        target = config if env.get("KAGGLE_CONFIG_DIR") else home / ".kaggle" / "kaggle.json"
        raise KitError("no Kaggle credentials found: set KAGGLE_USERNAME and KAGGLE_KEY, or save "
                       f"kaggle.json as {target} (then chmod 600 {target}), or set "
                       f"KAGGLE_API_TOKEN; {TOKEN_HELP}")
    return Credentials(found, tuple(sorted(set(s for s in secrets if len(s) >= 4), key=len,
                                           reverse=True)))


def _read_kaggle_json(path: Path) -> dict:
    _check_private(path)
    try:
        values = json.loads(path.read_text())
    except (ValueError, OSError):
        # never echo the content: it holds the key
        raise KitError(f"{path}: not valid JSON; expected "
                       '{"username": "...", "key": "..."} ' f"({TOKEN_HELP})")
    if not isinstance(values, dict) or not values.get("username") or not values.get("key"):
        raise KitError(f'{path}: needs both "username" and "key" ({TOKEN_HELP})')
    return values


def scrub(text: str, secrets) -> str:
    """``text`` with every secret replaced by ``***`` and squeezed onto one line."""
    text = str(text)
    for secret in secrets:
        text = text.replace(secret, MASK)
    return " ".join(text.split())


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


# ----------------------------------------------------------------------------- the client

def load_kaggle_api():
    """The ``KaggleApi`` class, imported without running ``kaggle/__init__.py``.

    That ``__init__`` authenticates at import time: it prints a long help text without
    credentials and calls the network with an access token. A bare package module in
    ``sys.modules`` lets ``kaggle.api.kaggle_api_extended`` import on its own.
    """
    if "kaggle" not in sys.modules:
        spec = importlib.util.find_spec("kaggle")
        if spec is None or not spec.submodule_search_locations:
            raise KitError("the kaggle package is not installed; ./run.sh installs "
                           "requirements.txt into .venv")
        from importlib.metadata import version

        pkg = types.ModuleType("kaggle")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__, pkg.__file__ = spec, spec.origin
        pkg.__version__ = version("kaggle")
        sys.modules["kaggle"] = pkg
    from kaggle.api.kaggle_api_extended import KaggleApi

    return KaggleApi


class KaggleSession:
    """The kaggle client behind a gate: captured output, scrubbed one-line errors.

    Parameters
    ----------
    creds : Credentials
        From :func:`find_credentials`; its secrets are masked in every message.
    competition : str
        Competition slug, used in hints.
    """

    def __init__(self, creds: Credentials, competition: str):
        self.creds, self.competition = creds, competition
        self.output = io.StringIO()  # what the client printed; never shown unscrubbed
        with self._gate("Kaggle authentication failed"):
            self.api = load_kaggle_api()()
            self.api.authenticate()

    @contextlib.contextmanager
    def _gate(self, what: str):
        with contextlib.redirect_stdout(self.output), contextlib.redirect_stderr(self.output):
            try:
                yield
            except KitError:
                raise
            except SystemExit:
                raise KitError(f"{what}: the kaggle client found no usable credentials in "
                               f"{self.creds.source}; {TOKEN_HELP}") from None
            except Exception as exc:  # noqa: BLE001 - anything from the client becomes one line
                raise KitError(f"{what}: {self._reason(exc)}") from None

    def _reason(self, exc: Exception) -> str:
        import requests

        response = getattr(exc, "response", None)
        if isinstance(exc, requests.HTTPError) and response is not None:
            return self._scrub(http_reason(response.status_code, _server_message(response, exc),
                                           self.competition))
        if isinstance(exc, requests.ConnectionError):
            return self._scrub(f"could not reach Kaggle ({type(exc).__name__}); check the "
                               "network and try again")
        return self._scrub(f"{type(exc).__name__}: {exc}")

    def _scrub(self, text: str) -> str:
        return scrub(text, self.creds.secrets)

    def last_output(self) -> str:
        lines = [line for line in self.output.getvalue().splitlines() if line.strip()]
        return self._scrub(lines[-1]) if lines else ""

    def submit(self, csv_path: Path, message: str) -> dict:
        """Upload; return ``{"ref", "kaggle_message"}`` or raise ``KitError``."""
        with self._gate("upload failed"):
            response = self.api.competition_submit(str(csv_path), message, self.competition,
                                                   quiet=True)
        text = self._scrub(getattr(response, "message", "") or "")
        if SUCCESS_MARK.lower() not in text.lower():
            detail = self.last_output()
            if text == self.api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:
                text += " (the file upload was refused or interrupted; try again later)"
            raise KitError(f"Kaggle did not accept the submission: {text or 'no message'}"
                           + (f" [{detail}]" if detail else ""))
        return {"ref": int(getattr(response, "ref", 0) or 0) or None, "kaggle_message": text}

    def status(self, ref: int | None, message: str) -> dict | None:
        """The submission's ``status``, ``public_score`` and ``error`` (None if not listed)."""
        with self._gate("could not read the submission status"):
            listed = self.api.competition_submissions(self.competition) or []
        for sub in listed:
            if sub is None:
                continue
            if (ref and sub.ref == ref) or (not ref and sub.description == message):
                return {"status": sub.status.name.lower(),
                        "public_score": _score(sub.public_score),
                        "error": self._scrub(sub.error_description or "") or None}
        return None


def _score(value) -> float | None:
    """Kaggle sends scores as strings; an empty or odd one means not scored (yet)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def http_reason(code: int, detail: str, competition: str) -> str:
    """One line saying what an HTTP error from Kaggle means and what to do."""
    detail = detail or "no message"
    if code == 401:
        return (f"Kaggle rejected the credentials (HTTP 401: {detail}); check KAGGLE_USERNAME "
                f"and KAGGLE_KEY or kaggle.json, or {TOKEN_HELP}")
    if code == 403:
        return (f"Kaggle refused the request (HTTP 403: {detail}); accept the rules at "
                f"https://www.kaggle.com/competitions/{competition}/rules, or the daily "
                "submission limit is reached")
    if code == 404:
        return f"competition {competition!r} not found (HTTP 404: {detail}); check --competition"
    if code == 429 or any(w in detail.lower() for w in ("limit", "allowance", "quota")):
        return (f"submission limit reached (HTTP {code}: {detail}); submit again when the "
                "daily quota resets")
    if code >= 500:
        return f"Kaggle server error (HTTP {code}: {detail}); try again later"
    return f"Kaggle refused the request (HTTP {code}: {detail})"


def _server_message(response, exc) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        body = response.json()
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    return str(exc)


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

def run_submit(paths: Paths, message: str, cfg: dict, csv=None,
               competition: str | None = None, wait: bool = False, dry_run: bool = False,
               data=None, env=None, echo=print) -> dict:
    """Validate, upload and record one submission; return its record.

    Parameters
    ----------
    paths : Paths
        Work directory (``submissions/latest.csv`` is the default CSV).
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
    data : path, optional
        Dataset root; its ``test_data/`` gives the expected rows when present.
    cfg : dict
        The resolved ``submit`` config.

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
