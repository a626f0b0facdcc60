"""The kit's one logger, ``kit``: every stage's status lines go through it and come out as plain
lines on standard output, as a user reads them; ``-q`` keeps warnings only, ``-v`` adds debug
lines. Modules log with ``logging.getLogger(__name__)``."""
from __future__ import annotations

import contextlib
import logging
import sys

LOGGER = logging.getLogger("kit")
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


class _Stdout(logging.Handler):
    """Writes each message on the ``sys.stdout`` of the moment (a test or a caller may have
    redirected it since the handler was made)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 (logging's own convention)
            self.handleError(record)


def _install() -> logging.Handler:
    for handler in LOGGER.handlers:
        if isinstance(handler, _Stdout):
            return handler
    handler = _Stdout()
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False  # the lines are the user's output, not a library's records
    return handler


HANDLER = _install()


def set_verbosity(verbosity: int) -> None:
    """-1 (``-q``): warnings only; 0: the usual lines; 1 (``-v``): debug lines too."""
    LOGGER.setLevel(LEVELS[max(-1, min(1, int(verbosity)))])


@contextlib.contextmanager
def capture():
    """Collect the kit's lines instead of printing them: ``with capture() as lines: ...``.

    The caller decides what to show (``tune``'s full objective keeps each fold's summary).
    """
    lines: list[str] = []

    class _Keep(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            lines.append(record.getMessage())
            return False

    keep = _Keep()
    HANDLER.addFilter(keep)
    try:
        yield lines
    finally:
        HANDLER.removeFilter(keep)
