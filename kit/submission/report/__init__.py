"""``runs/report.html``: one self-contained page on the data, the CV runs, the blend and the
submissions.

Every image is inlined (``data:`` URIs: PNG plots, JPEG thumbnails), so the file can be
mailed or opened offline. Each section reads only the files its stage wrote and, when they
do not exist yet, says which command makes them; a section whose files cannot be read shows
why instead of failing the whole page. The sections, one module each here, gather plain values
(text, numbers, tables as lists of rows, :mod:`kit.submission.report.layout`); the Jinja2
templates ``kit/templates/report.html`` and ``kit/templates/report/<section>.html`` lay them
out and escape them.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from kit import __version__
from kit.config import given
from kit.metrics import get_metric
from kit.paths import Paths
from kit.submission.report.attention import attention_section
from kit.submission.report.blend import blend_section
from kit.submission.report.calibration import reliability_section
from kit.submission.report.cv import cv_section
from kit.submission.report.data import data_section
from kit.submission.report.label_issues import label_issues_section
from kit.submission.report.layout import READ_ERRORS, Todo
from kit.submission.report.submissions import submissions_section
from kit.submission.report.tune import tune_section
from kit.task import as_data
from kit.templates import render
from kit.utils import atomic_write_text, write_config

log = logging.getLogger(__name__)


def run_report(paths: Paths, data, cfg: dict) -> Path:
    """Write ``runs/report.html`` from whatever the stages have written so far; return its path.

    The scores come first (cross-validation, blend, tuning, submissions), then the data, the
    suspected label errors and the attention heads, whose thumbnails are folded away.

    Parameters
    ----------
    paths : Paths
        The work directory.
    data : Data or path
        Dataset root and its task (a path: its ``task.yaml``, else the built-in task): the
        labels and training images for the counts and thumbnails; the task's classes and
        metric name every score.
    cfg : dict
        The resolved ``report`` config.
    """
    cfg = given(cfg, "report")
    data = as_data(data)
    task = data.task
    sections = [
        ("cv", "Cross-validation", lambda: cv_section(paths, task)),
        ("blend", "Blend", lambda: blend_section(paths, task)),
        ("tune", "Tuning", lambda: tune_section(paths)),
        ("submissions", "Submissions", lambda: submissions_section(paths, task)),
        ("calibration", "Reliability of the blended OOF probabilities",
         lambda: reliability_section(paths, cfg, task)),
        ("data", "Data", lambda: data_section(paths, data, cfg)),
        ("label_issues", "Suspected label errors",
         lambda: label_issues_section(paths, data, cfg)),
        ("attention", "Attention over patches", lambda: attention_section(paths, cfg)),
    ]
    page = render("report.html", version=__version__,
                  stamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  workdir=str(paths.root), data=str(data), task=task.name,
                  metric=get_metric(task.metric).title,
                  sections=[_section(anchor, title, build) for anchor, title, build in sections])
    out = paths.runs_dir / "report.html"
    atomic_write_text(out, str(page))
    write_config(paths.runs_dir / "report_config.yaml", {**cfg, "data": str(data)})
    return out


def _section(anchor: str, title: str, build) -> dict:
    """A section for the page: its template ``report/<anchor>.html`` filled with what
    ``build`` returns, or the read error that stopped it."""
    try:
        content = build()
        html = (render("report/todo.html", what=content.what, command=content.command)
                if isinstance(content, Todo) else render(f"report/{anchor}.html", **content))
    except READ_ERRORS as exc:
        log.warning(f"report: section {title!r} skipped: {exc}")
        return {"anchor": anchor, "title": title, "error": str(exc), "html": ""}
    return {"anchor": anchor, "title": title, "error": None, "html": html}
