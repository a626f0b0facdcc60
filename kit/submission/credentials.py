"""Where the kaggle client will find its credentials, checked before it runs, and the secrets
that no message of the kit may show (:func:`scrub`).

The client's own order: an access token (``KAGGLE_API_TOKEN`` or ``~/.kaggle/access_token``),
then ``KAGGLE_USERNAME`` + ``KAGGLE_KEY`` over ``kaggle.json``, then ``kaggle auth login``'s
``~/.kaggle/credentials.json``. Unlike the client, a credential file other users can read is
refused, not warned about.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from kit.utils import KitError

MASK = "***"
TOKEN_HELP = "create one at https://www.kaggle.com/settings/api"


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
                       '{"username": "...", "key": "..."} ' f"({TOKEN_HELP})") from None
    if not isinstance(values, dict) or not values.get("username") or not values.get("key"):
        raise KitError(f'{path}: needs both "username" and "key" ({TOKEN_HELP})')
    return values


def scrub(text: str, secrets) -> str:
    """``text`` with every secret replaced by ``***`` and squeezed onto one line."""
    text = str(text)
    for secret in secrets:
        text = text.replace(secret, MASK)
    return " ".join(text.split())
