"""Jinja2 templates of the kit's HTML pages (``runs/report.html``, ``runs/clean/review.html``).

One environment, autoescaping on: the pages' code hands the templates plain values (text,
numbers, ``data:`` URIs, tables as lists of rows) and never escapes or writes markup itself.
"""
from __future__ import annotations

import base64
from functools import lru_cache

import jinja2
from markupsafe import Markup


@lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    """The templates of this folder, HTML-escaped; an undefined name is an error, not blank."""
    return jinja2.Environment(loader=jinja2.PackageLoader("kit", "templates"),
                              autoescape=jinja2.select_autoescape(["html"]),
                              undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True, keep_trailing_newline=True)


def render(name: str, /, **context) -> Markup:
    """Template ``name`` rendered with ``context``: safe HTML, to embed in another page as is."""
    return Markup(environment().get_template(name).render(**context))


def data_uri(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,...``: an image inlined, so the page needs no other file."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
