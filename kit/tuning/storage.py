"""Where Optuna studies live: SQLite by default, any RDB URL or a journal file on request.

RDB storages (SQLite, PostgreSQL, MySQL) get a heartbeat: a trial whose worker died (kill -9,
a lost machine) stops beating, is failed after the grace period by the next worker that starts
a trial, and is re-queued with the same parameters (``RetryHeartbeatStaleTrialCallback``).
A journal file has no heartbeat: a dead worker's trial stays RUNNING there.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from sqlalchemy.engine import make_url

from kit.utils import KitError

JOURNAL_PREFIX = "journal:"


def default_url(paths) -> str:
    """``sqlite:///<abs>/runs/optuna.db`` of this work directory (what optuna-dashboard reads)."""
    return f"sqlite:///{(paths.runs_dir / 'optuna.db').resolve()}"


def describe(url: str) -> str:
    """The URL with any password hidden, safe to print and to write into best.yaml."""
    if url.startswith(JOURNAL_PREFIX) or "://" not in url:
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL fails properly in make_storage
        return url


def make_storage(url: str | None, paths, heartbeat_interval: int = 60, grace_period: int = 180,
                 max_retry: int | None = 3):
    """An Optuna storage for ``url``.

    Parameters
    ----------
    url : str or None
        Empty/None: SQLite ``runs/optuna.db``. ``journal:PATH`` or a path ending in ``.log``:
        a journal file (several processes on one host, no server). Anything else: an
        SQLAlchemy URL (``postgresql+psycopg2://user:pw@host:port/db``, ``mysql+pymysql://...``,
        ``sqlite:///...``).
    heartbeat_interval, grace_period : int
        Seconds; ``heartbeat_interval <= 0`` turns the heartbeat off.
    max_retry : int or None
        How often a trial of a dead worker is re-queued (None: without limit).
    """
    url = (url or "").strip() or default_url(paths)
    if url.startswith(JOURNAL_PREFIX) or (url.endswith(".log") and "://" not in url):
        path = Path(url[len(JOURNAL_PREFIX):] if url.startswith(JOURNAL_PREFIX) else url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise KitError(f"--storage {url!r}: not an RDB URL (e.g. sqlite:///runs/optuna.db, "
                       "postgresql+psycopg2://user:pw@host:5432/db) nor a journal file "
                       "(journal:PATH or *.log)")
    engine_kwargs = {}
    if url.startswith("sqlite:"):
        db = url.split(":///", 1)[-1]
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        # Several workers on one SQLite file wait for its lock instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            kwargs = {}
            if heartbeat_interval and heartbeat_interval > 0:
                kwargs = dict(heartbeat_interval=int(heartbeat_interval),
                              grace_period=int(max(grace_period, heartbeat_interval + 1)),
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                                  max_retry=max_retry))
            return _rdb_storage(RDBStorage, url, engine_kwargs, kwargs)
    except ImportError as exc:
        raise KitError(f"--storage {describe(url)}: its database driver is not installed "
                       f"({exc}); PostgreSQL needs postgresql+psycopg2:// (psycopg2-binary is "
                       "in requirements.txt)") from exc
    except Exception as exc:  # sqlalchemy raises many types for a bad URL or a down server
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise KitError(f"--storage {describe(url)}: cannot open ({first}); check the URL and "
                       "that the server is running") from exc


def _rdb_storage(cls, url: str, engine_kwargs: dict, kwargs: dict, tries: int = 3):
    """``RDBStorage``, retried when another worker is creating Optuna's tables right now
    (PostgreSQL answers that race with a UniqueViolation; the second try finds the tables)."""
    for attempt in range(tries):
        try:
            return cls(url, engine_kwargs=engine_kwargs, **kwargs)
        except Exception as exc:  # sqlalchemy.exc.IntegrityError/ProgrammingError, driver-wrapped
            text = str(exc)
            racing = "UniqueViolation" in text or "already exists" in text
            if not racing or attempt == tries - 1:
                raise
            time.sleep(1.0 + attempt)
