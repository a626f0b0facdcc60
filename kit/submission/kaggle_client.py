"""The kaggle package's Python API behind the guards the client lacks.

- ``import kaggle`` authenticates (and prints, or calls the network) at import time, so the
  client module is imported without running the package's ``__init__``
  (:func:`load_kaggle_api`);
- ``authenticate()`` exits the process (``SystemExit``) instead of raising, and
  ``competition_submit`` reports some failures in its returned ``message``: both become a
  ``KitError`` with a one-line reason (:class:`KaggleSession`, :func:`http_reason`);
- whatever the client prints is captured, and every message is scrubbed of the key or token
  before it reaches the user or a file.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import types
from importlib.metadata import version
from pathlib import Path

import requests

from kit.submission.credentials import TOKEN_HELP, Credentials, scrub
from kit.utils import KitError

SUCCESS_MARK = "Successfully"  # what competition_submit's message says when it worked


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
        pkg = types.ModuleType("kaggle")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__, pkg.__file__ = spec, spec.origin
        pkg.__version__ = version("kaggle")
        sys.modules["kaggle"] = pkg
    # Imported here, once the stand-in package above is in sys.modules.
    from kaggle.api.kaggle_api_extended import KaggleApi

    return KaggleApi


class KaggleSession:
    """The kaggle client behind a gate: captured output, scrubbed one-line errors.

    Parameters
    ----------
    creds : Credentials
        From :func:`kit.submission.credentials.find_credentials`; its secrets are masked in
        every message.
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
