"""What the report's sections hand the templates: text cells, tables, inlined images and the
note of a section whose stage has not run; the JSON reader and the read errors every section
shares."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kit.metrics import format_ci
from kit.templates import data_uri
from kit.utils import KitError

# What a section may hit in files of an older or half-written run: shown, not raised.
READ_ERRORS = (KitError, OSError, ValueError, KeyError, TypeError, IndexError)


@dataclass(frozen=True)
class Todo:
    """A section whose stage has not run: what is missing and the command that makes it."""
    what: str
    command: str


def fmt(value, digits: int = 4) -> str:
    """A table cell or caption number as text: floats to ``digits`` places, none as a dash."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def score_ci(score, ci) -> str | None:
    """``0.499 [0.46, 0.54]`` (:func:`kit.metrics.format_ci`), the score alone when no
    interval is known, None (a dash) when there is no score."""
    if not isinstance(score, (int, float)) or isinstance(score, bool) or score != score:
        return score
    return format_ci(float(score), interval(ci))


def interval(ci) -> list[float] | None:
    """``[lo, hi]`` from a recorded interval, or None when absent or malformed."""
    if isinstance(ci, (list, tuple)) and len(ci) == 2 \
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ci):
        return [float(ci[0]), float(ci[1])]
    return None


@dataclass(frozen=True)
class Bold:
    """A table cell shown in bold (``cls``: ok or warn colours it)."""
    text: str
    cls: str = ""


def make_table(header: list, rows: list[list], cls: str = "") -> dict:
    """A table for ``report/macros.html``: every cell text (:func:`fmt`) or :class:`Bold`."""
    return {"header": [str(h) for h in header], "cls": cls,
            "rows": [[v if isinstance(v, Bold) else fmt(v) for v in row] for row in rows]}


def inline_image(data: bytes, mime: str = "image/png", alt: str = "", cls: str = "") -> dict:
    return {"src": data_uri(data, mime), "alt": str(alt), "cls": cls}


def figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buf.getvalue()


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise KitError(f"{path}: not valid JSON ({exc})") from None


def honesty_cell(honest: bool) -> Bold:
    return Bold("honest", "ok") if honest else Bold("optimistic", "warn")
