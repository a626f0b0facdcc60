"""Path patterns of a task file: their ``{fields}``, the regex and glob that find their files,
and the id_pattern text helpers (no pydantic, no data read)."""
from __future__ import annotations

import difflib
import re
import string
from functools import cache

# Fields every path pattern may use besides id_pattern's named groups; label only in the
# folders layout's training patterns, where the class is the image's folder.
ID, LABEL = "id", "label"


@cache
def pattern_fields(pattern: str) -> tuple[str, ...]:
    """The ``{fields}`` of a path pattern, each once, in order of appearance.

    Raises ValueError for a field that is not a plain name (``{}``, ``{0}``, ``{a.b}``,
    ``{id:>4}``) or an unbalanced brace.
    """
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as exc:
        raise ValueError(f"{pattern!r} is not a valid pattern ({exc}); write fields as {{id}} "
                         "and a literal brace as {{ or }}") from None
    out: list[str] = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            shown = ("{" + field + (f"!{conversion}" if conversion else "")
                     + (f":{spec}" if spec else "") + "}")
            raise ValueError(f"{pattern!r} has field {shown}; fields are plain names such as "
                             "{id}, with no format spec")
        if field not in out:
            out.append(field)
    return tuple(out)


def _safe_fields(pattern: str) -> tuple[str, ...]:
    try:
        return pattern_fields(pattern)
    except ValueError:
        return ()


@cache
def pattern_regex(pattern: str) -> re.Pattern:
    """A regex matching the relative paths ``pattern`` describes; each field a named group
    of one path component (a repeated field must repeat its value)."""
    out, seen = [], set()
    for literal, field, _, _ in string.Formatter().parse(pattern):
        out.append(re.escape(literal))
        if field is None:
            continue
        out.append(f"(?P={field})" if field in seen else f"(?P<{field}>[^/]+)")
        seen.add(field)
    return re.compile("".join(out))


def pattern_glob(pattern: str) -> str:
    """A glob finding the candidate files of ``pattern`` (each field one ``*``)."""
    import glob

    return "".join(glob.escape(literal) + ("*" if field is not None else "")
                   for literal, field, _, _ in string.Formatter().parse(pattern))


def pattern_folder(pattern: str) -> str:
    """The fixed folder part of a pattern before its first field (``train/{label}/{id}.png``
    -> ``train``; ``{id}.png`` -> ``""``)."""
    head = ""
    for literal, field, _, _ in string.Formatter().parse(pattern):
        head += literal
        if field is not None:
            break
    else:
        head = head.rsplit("/", 1)[0] + "/" if "/" in head else ""  # no field: a fixed file
    return head.rsplit("/", 1)[0] if "/" in head else ""


@cache
def _id_regex(id_pattern: str) -> re.Pattern:
    return re.compile(id_pattern)


def _fill_groups(id_pattern: str, fields: dict[str, str]) -> str | None:
    """``id_pattern`` with each named group replaced by its value and escapes undone, when
    the rest is literal text; None when it is not (``a|b``, ``\\d+`` outside a group, ...)."""
    out, i, n = [], 0, len(id_pattern)
    while i < n:
        if id_pattern.startswith("(?P<", i):
            end = id_pattern.index(">", i)
            name = id_pattern[i + 4:end]
            depth, j = 1, end + 1
            while j < n and depth:
                if id_pattern[j] == "\\":
                    j += 2
                    continue
                depth += {"(": 1, ")": -1}.get(id_pattern[j], 0)
                j += 1
            if depth or name not in fields:
                return None
            out.append(fields[name])
            i = j
        elif id_pattern[i] == "\\" and i + 1 < n and not id_pattern[i + 1].isalnum():
            out.append(id_pattern[i + 1])
            i += 2
        elif id_pattern[i] in ".^$*+?{}[]|()\\":
            if id_pattern[i] in "^$" and (i == 0 or i == n - 1):
                i += 1  # anchors at the ends add no text
                continue
            return None
        else:
            out.append(id_pattern[i])
            i += 1
    return "".join(out)


def squash(text: str) -> str:
    """``text`` without spaces, case-folded: labels that differ only in those mean one class."""
    return "".join(text.split()).casefold()


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
