"""How a process a user watches ends: a bad input as one line (exit 2), Ctrl-C as one line
(exit 130), warnings without source lines. Shared by the CLI and the tune workers."""
from __future__ import annotations

import sys
import warnings

from kit.utils import KitError


def print_kit_error(exc: KitError) -> int:
    """The user's view of a bad input: one line, one more per problem, exit code 2."""
    print(f"error: {exc}", file=sys.stderr)
    for line in exc.problems:
        print(f"  {line}", file=sys.stderr)
    return 2


def _plain_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"  # for users: no source file and line


def run_for_user(call, interrupted: str) -> int:
    """Run ``call()`` as a process a user watches: warnings as plain lines, a
    :class:`KitError` as one line (exit 2), Ctrl-C as the line ``interrupted`` (exit 130)."""
    warnings.formatwarning = _plain_warning
    try:
        return int(call() or 0)
    except KitError as exc:
        return print_kit_error(exc)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
