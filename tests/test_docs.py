"""The documentation is finished and true to the code.

- No Markdown page holds a placeholder: an ALL_CAPS_WITH_UNDERSCORES token alone on a line or
  in a table cell (outside code spans, where `KIT_PYTHON` and the like are names), or TODO,
  TBD, FIXME, XXX.
- No tracked file points outside the repository (the development machines' shared notes).
- docs/DESIGN.md cites what exists: every `kit.x.y` name imports, every `kit/x/y.py` path and
  every file of its layout tree exists, and every `name(args)` it writes fits the function's
  parameters. The other pages' `kit.x.y` names and `kit/...` paths exist as well.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "DESIGN.md"


def markdown_pages() -> list[Path]:
    return sorted([*REPO.glob("*.md"), *(REPO / "docs").rglob("*.md")])


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# --------------------------------------------------------------------------- Markdown structure
FENCE = re.compile(r"^ *(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)


def split_fences(text: str) -> tuple[str, list[tuple[int, list[str]]]]:
    """The text with fenced blocks blanked (line numbers kept), and the blocks themselves as
    (line number of their first line, lines)."""
    out, blocks, block = [], [], None
    for n, line in enumerate(text.split("\n"), start=1):
        if FENCE.match(line):
            if block is None:
                block = (n + 1, [])
            else:
                blocks.append(block)
                block = None
            out.append("")
        elif block is not None:
            block[1].append(line)
            out.append("")
        else:
            out.append(line)
    return "\n".join(out), blocks


def code_spans(prose: str) -> list[tuple[int, str]]:
    """Inline code spans of fence-free text, as (line number, content); a span may wrap."""
    return [(prose.count("\n", 0, m.start()) + 1, m.group(2)) for m in CODE_SPAN.finditer(prose)]


def without_code_spans(prose: str) -> str:
    """``prose`` with each inline code span blanked, newlines kept (so line numbers hold)."""
    return CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)


# --------------------------------------------------------------------------- placeholders
CAPS = r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+"
ALONE = re.compile(rf"^\s*{CAPS}\s*$")
IN_CELL = re.compile(rf"(?<![\w`]){CAPS}(?![\w`])")
MARKERS = re.compile(r"\b(TODO|TBD|FIXME|XXX)\b")


def placeholders(text: str) -> list[tuple[int, str]]:
    """(line number, what) for every placeholder in Markdown ``text``."""
    prose, blocks = split_fences(text)
    found = []
    for n, line in enumerate(without_code_spans(prose).split("\n"), start=1):
        if ALONE.match(line):
            found.append((n, line.strip()))
        elif line.lstrip().startswith("|"):
            cells = re.split(r"(?<!\\)\|", line)
            found += [(n, m.group()) for cell in cells for m in IN_CELL.finditer(cell)]
        found += [(n, m.group()) for m in MARKERS.finditer(line)]
    for start, lines in blocks:  # a marker in a code example is unfinished too
        found += [(start + i, m.group()) for i, line in enumerate(lines)
                  for m in MARKERS.finditer(line)]
    return sorted(found)


# Lines of docs/benchmarks.md before its bench-regions results were written in.
UNFILLED = """\
| bench | what is compared | result | target |
|---|---|---|---|
| `regions` | `per_region` vs `top_k` | REGIONS_ROW (section *`bench regions`* below) | win |

### Results, `quick` preset (2026-12-04)

STANDARD_RESULTS

## `bench noise`: accuracy levers on noisy labels
"""


def test_the_placeholder_check_catches_the_unfilled_results():
    assert placeholders(UNFILLED) == [(3, "REGIONS_ROW"), (7, "STANDARD_RESULTS")]
    for marker in ("TODO", "TBD", "FIXME", "XXX"):
        assert placeholders(f"Some text.\n{marker}: write the numbers\n") == [(2, marker)]
        assert placeholders(f"```bash\n./run.sh cv {marker}\n```\n") == [(2, marker)]
    assert placeholders("| a | `x` |\n| b | RESULT_B |\n") == [(2, "RESULT_B")]


def test_the_placeholder_check_leaves_names_in_code_alone():
    ok = """\
In a notebook, run `KIT_PYTHON=$(which python) ./run.sh ...` instead.
| variable | what |
|---|---|
| `KIT_PROGRESS_INTERVAL` | seconds between log lines; `HF_HUB_OFFLINE=1` |
`./run.sh compare RUN_A
RUN_B` tells whether two runs differ.
`STANDARD_RESULTS`

```bash
export KIT_WEIGHTS_DIR=/weights
KIT_DATA
```
Words: OPTIMISTIC, TODOS, XXXL, img_XXXX.png, a FIXME_LATER name.
"""
    assert placeholders(ok) == []


@pytest.mark.parametrize("page", markdown_pages(), ids=rel)
def test_no_page_holds_a_placeholder(page):
    found = placeholders(page.read_text())
    assert not found, f"{rel(page)}: placeholder(s) " + ", ".join(
        f"line {n}: {what!r}" for n, what in found)


# --------------------------------------------------------------------------- outside pointers
# spelled in pieces, so that this file does not cite them itself
OUTSIDE = ("/work/" + "shared", "shared/" + "NOTES.md", "shared/" + "DATASET.md")


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout ({exc})")
    return [name for name in out.decode().split("\0") if name]


def test_no_tracked_file_points_outside_the_repository():
    hits = []
    for name in tracked_files():
        path = REPO / name
        if not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", "replace")
        for n, line in enumerate(text.split("\n"), start=1):
            hits += [f"{name}:{n}: {what}" for what in OUTSIDE if what in line]
    assert not hits, ("files cite the development machines' shared notes, which users do not "
                      "have; cite the kit's own page (docs/data.md, docs/environments.md):\n"
                      + "\n".join(hits))


# --------------------------------------------------------------------------- names in the code
DOTTED = re.compile(r"(?<![\w./-])kit(?:\.[A-Za-z_]\w*)+(?::[A-Za-z_]\w*)?")
KIT_PATH = re.compile(r"(?<![\w./-])kit/[\w./<>*{},-]*")
CALL = re.compile(r"(?:(?<![\w.])|(?<=\)\.))((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)\(")


def brace_expand(text: str) -> list[str]:
    """``atomic_write_{text,csv}`` -> ``atomic_write_text``, ``atomic_write_csv``."""
    m = re.search(r"\{([^{}]*,[^{}]*)\}", text)
    if not m:
        return [text]
    return [x for alt in m.group(1).split(",")
            for x in brace_expand(text[:m.start()] + alt.strip() + text[m.end():])]


def resolve(dotted: str):
    """The object ``kit.a.b.C`` (or ``kit.a:b``) names: the longest importable module
    prefix, then attributes. Raises LookupError saying which part is missing."""
    module_part, _, attr = dotted.partition(":")
    parts = module_part.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not name.startswith(exc.name):
                raise  # the module exists but one of its imports is missing
            continue
        rest = parts[cut:] + ([attr] if attr else [])
        for i, part in enumerate(rest):
            if not hasattr(obj, part):
                where = ".".join([name, *rest[:i]])
                raise LookupError(f"no module {where}.{part}" if hasattr(obj, "__path__")
                                  else f"{where} has no {part!r}")
            obj = getattr(obj, part)
        return obj
    raise LookupError(f"no module {parts[0]}")


def path_exists(cited: str) -> bool:
    """A cited repository path exists; ``<name>`` and ``*`` are wildcards, braces alternatives."""
    cited = cited.rstrip(".,;:)")
    for alt in brace_expand(cited):
        pattern = re.sub(r"<[^<>]*>", "*", alt).rstrip("/")
        if not any(REPO.glob(pattern)) if "*" in pattern else not (REPO / pattern).exists():
            return False
    return True


def tree_paths(lines: list[str]) -> list[tuple[int, str]]:
    """The files and folders a layout tree block lists, as (index of its line, path).

    The tree is written with ``├──``/``└──`` branches, four columns a level; an entry holds one
    or more names separated by two or more spaces, then a description."""
    stack: list[str] = []
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"^((?:[│ ]   )*)[├└]── (.*)$", line)
        if not m:
            if i == 0 and line.strip().endswith("/"):
                stack = [line.strip().rstrip("/")]
            continue
        depth = len(m.group(1)) // 4 + 1
        names = []
        for token in re.split(r"\s{2,}", m.group(2).strip()):
            if not re.fullmatch(r"[\w.-]+/?", token) or not re.search(r"\.\w+$|/$", token):
                break
            names.append(token)
        del stack[depth:]
        for name in names:
            out.append((i, "/".join([*stack[:depth], name.rstrip("/")])))
        if len(names) == 1 and names[0].endswith("/"):
            stack.append(names[0].rstrip("/"))
    return out


def split_args(args: str) -> list[str]:
    """Top-level comma-separated pieces of an argument list as the page writes it."""
    pieces, depth, cur = [], 0, ""
    for ch in args:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            pieces.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        pieces.append(cur.strip())
    return pieces


def calls(span: str) -> list[tuple[str, str, str | None]]:
    """(name as written, argument text, the call it is chained on) for each ``name(...)`` in a
    code span; ``A(x).fit(y)`` gives ``fit`` chained on ``A``."""
    out = []
    for m in CALL.finditer(span):
        depth, end = 0, None
        for j in range(m.end() - 1, len(span)):
            depth += {"(": 1, ")": -1}.get(span[j], 0)
            if depth == 0:
                end = j
                break
        if end is None:
            continue
        before = span[:m.start()]
        chained = re.search(r"((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)\([^()]*\)\.$", before)
        out.append((m.group(1), span[m.end():end], chained.group(1) if chained else None))
    return out


def parameters(obj) -> list[inspect.Parameter] | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return list(sig.parameters.values())


def plain(p: inspect.Parameter) -> str:
    """A parameter as the page writes it: its name, ``=default``, ``*``/``**``; no annotation."""
    star = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
    default = "" if p.default is p.empty else f"={p.default!r}"
    return f"{star}{p.name}{default}"


def signature_problem(written: str, args: str, obj, from_class: bool) -> str | None:
    """Why ``written(args)`` does not fit ``obj``'s parameters, or None.

    The page's convention: ``f()`` only names the function; otherwise the arguments are the
    parameter names in order (``name=value`` with the default, or an example value), ``...``
    for parameters left out. Without a leading ``...`` the first ones are the function's first
    parameters, in order, until the first ``...``; every required parameter is written unless
    a ``...`` stands for it; a literal default must be the function's."""
    pieces = split_args(args)
    if not pieces:
        return None
    params = parameters(obj)
    if params is None:
        return None
    if from_class and params and params[0].name in ("self", "cls") and not isinstance(
            obj, (staticmethod, classmethod)):
        params = params[1:]
    names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params)
    by_name = {p.name: p for p in params}
    shown, star = [], any(p.kind == p.VAR_POSITIONAL for p in params)
    for p in params:
        if p.kind == p.KEYWORD_ONLY and not star:
            shown.append("*")
            star = True
        shown.append(plain(p))
    real = f"{written.split('.')[-1]}({', '.join(shown)})"
    page, gap_before = [], []
    gap = False
    for piece in pieces:
        if piece == "..." or piece.endswith("..."):
            gap = True
            continue
        if piece == "*":  # keyword-only from here: the names still follow in order
            continue
        m = re.fullmatch(r"\*{0,2}([A-Za-z_]\w*)(?:\s*=\s*(.+))?", piece, re.S)
        if not m:
            return None  # not written as parameters (an example call): the name is enough
        page.append((m.group(1), m.group(2)))
        gap_before.append(gap)
        gap = False
    trailing_gap = gap
    problems = []
    position = -1
    for k, (name, value) in enumerate(page):
        if name not in by_name:
            if takes_kwargs:
                continue
            there = names[position + 1] if not gap_before[k] and position + 1 < len(names) else None
            problems.append(f"no parameter {name!r}" + (f" (the code has {there} there)"
                                                        if there else ""))
            position += 0 if gap_before[k] else 1
            continue
        index = names.index(name) if name in names else position + 1
        if index <= position:
            problems.append(f"{name!r} is out of order")
        elif not gap_before[k] and index != position + 1:
            missing = ", ".join(names[position + 1:index])
            after = f"after {page[k - 1][0]!r}" if k else "first"
            problems.append(f"{after} the code has {missing}, the page {name!r}")
        position = max(position, index)
        default = by_name[name].default
        if value is not None and default is not inspect.Parameter.empty:
            try:
                literal = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                continue
            if literal is not Ellipsis and literal != default:
                problems.append(f"{name}={value} but the default is {default!r}")
    if not any(gap_before) and not trailing_gap:
        written_names = {n for n, _ in page}
        missing = [p.name for p in params if p.default is inspect.Parameter.empty
                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                   and p.name not in written_names]
        if missing:
            problems.append(f"required parameter(s) {', '.join(missing)} not written "
                            "(write them, or ... for what is left out)")
    return f"{'; '.join(problems)} (the code: {real})" if problems else None


def design_citations(text: str):
    """What docs/DESIGN.md cites: (line, kind, text, scope) with kind dotted | path | call, or
    tree (a path of the layout tree);
    scope: the dotted names of the same item (bullet with its parent bullet, table row or
    paragraph), where a bare ``name(`` is looked up first."""
    prose, blocks = split_fences(text)
    lines = prose.split("\n")
    # items: a bullet and its continuation lines, a table row, a paragraph
    item_of, starts = [], []
    parent = None
    for n, line in enumerate(lines, start=1):
        stripped = line.strip()
        new = (not stripped or line.lstrip().startswith(("- ", "|", "#"))
               or not starts or not lines[n - 2].strip())
        if new:
            starts.append(n)
            if line.startswith("- ") or not stripped or line.startswith(("#", "|")):
                parent = None if not line.startswith("- ") else len(starts) - 1
        item_of.append((len(starts) - 1, parent))
    spans = code_spans(prose)
    dotted_in: dict[int, list[str]] = {}
    for n, span in spans:
        for name in [d.rstrip(".") for d in DOTTED.findall(span)] + KIT_PATH.findall(span):
            for key in set(item_of[n - 1]) - {None}:
                dotted_in.setdefault(key, []).append(name)
    out = []
    for n, span in spans:
        scope = [d for key in set(item_of[n - 1]) - {None} for d in dotted_in.get(key, [])]
        for name in DOTTED.findall(span):
            out.append((n, "dotted", name.rstrip("."), scope))
        for path in KIT_PATH.findall(span):
            out.append((n, "path", path, scope))
        for written, args, chained in calls(span):
            if args and not re.search(r"\w|\.\.\.", args):
                continue  # a column name such as p_HER2(+), not a call
            out.append((n, "call", (written, args, chained), scope))
    for start, block in blocks:
        for i, path in tree_paths(block):
            out.append((start + i, "tree", f"kit/{path}" if not path.startswith("kit")
                        else path, []))
    return out


def holders(cited: dict, paths: list[str]) -> dict[str, list]:
    """For each cited name or ``kit/...py`` path, where a bare name next to it may live: the
    module or class it is, else the module (or class) holding it; a path's modules."""
    out = {}
    for dotted, obj in cited.items():
        if inspect.ismodule(obj) or inspect.isclass(obj):
            out[dotted] = [obj]
        elif "." in dotted.replace(":", "."):
            try:
                out[dotted] = [resolve(re.split(r"[.:](?=[^.:]*$)", dotted)[0])]
            except LookupError:
                pass
    for cited_path in paths:
        pattern = re.sub(r"<[^<>]*>", "*", cited_path.rstrip(".,;:)"))
        files = [f for f in REPO.glob(pattern) if f.suffix == ".py"
                 and f.stem not in ("__init__", "__main__")]
        modules = []
        for f in sorted(files):
            try:
                modules.append(importlib.import_module(
                    ".".join(f.relative_to(REPO).with_suffix("").parts)))
            except ImportError:
                continue  # not importable from here: no names to look up in it
        out[cited_path] = modules
    return out


def lookup(name: str, scope: list[str], where: dict) -> list[tuple[object, bool]]:
    """(object, found on a class) for a name as the page writes it: ``kit.x.y`` resolved,
    a bare name in the holders of its item's citations, else in those of the whole page."""
    if name.startswith("kit."):
        return [(resolve(name), False)]
    for pool in ([h for d in scope for h in where.get(d, [])],
                 [h for found in where.values() for h in found]):
        found = [(getattr(h, name), inspect.isclass(h)) for h in pool if hasattr(h, name)]
        if found:
            return found
    return []


def check_call(name: str, args: str, chained: str | None, scope: list[str],
               where: dict) -> str | None:
    """Why the page's ``name(args)`` (chained on ``chained(...)``) is wrong, or None."""
    try:
        if chained:
            bases = [obj for base in brace_expand(chained) for obj, _ in lookup(base, scope, where)]
            found = [(getattr(b, name), True) for b in bases if hasattr(b, name)]
        else:
            found = lookup(name, scope, where)
    except LookupError as exc:
        return str(exc)
    if not found:
        return (f"no {name!r} on {chained}" if chained else
                f"no {name!r} in any module or class the page cites")
    reasons = []
    for obj, from_class in found:
        reason = signature_problem(name, args, obj, from_class)
        if reason is None:
            return None
        reasons.append(reason)
    return reasons[0]


def check_design(text: str) -> list[str]:
    """Every problem of docs/DESIGN.md's citations, one line each, with its line number."""
    citations = design_citations(text)
    problems, cited = [], {}
    for n, kind, what, _ in citations:
        if kind == "dotted":
            try:
                cited[what] = resolve(what)
            except LookupError as exc:
                problems.append(f"line {n}: `{what}`: {exc}")
        elif kind in ("path", "tree") and not path_exists(what):
            problems.append(f"line {n}: `{what}`: no such file or folder")
    where = holders(cited, [what for _, kind, what, _ in citations
                            if kind == "path" and path_exists(what)])
    for n, kind, what, scope in citations:
        if kind != "call":
            continue
        written, args, chained = what
        if "." in written and not written.startswith("kit."):
            continue  # np.load(...), torch.load(...): other libraries
        for name in brace_expand(written):
            problem = check_call(name, args, chained, scope, where)
            if problem:
                problems.append(f"line {n}: `{name}({args})`: {problem}")
    return sorted(problems, key=lambda line: int(line.split(":")[0].split()[1]))


def test_design_cites_what_exists():
    problems = check_design(DESIGN.read_text())
    assert not problems, ("docs/DESIGN.md cites what the code does not have (fix the page, "
                          "or the code):\n" + "\n".join(problems))


FIXTURE = '''\
"""A stand-in for the kit's modules: the design check's own test must not depend on today's
signatures (other changes move them)."""


class KitError(Exception):
    def __init__(self, message, problems=None):
        super().__init__(message)


class Search:
    def __init__(self, objective, cfg, random_state=None):
        pass

    def fit(self, P, y, folds):
        return self


def atomic_write_text(path, text):
    pass


def atomic_write_json(path, obj):
    pass


def progress(iterable, desc=""):
    return iterable


def launch(paths, kwargs, workers, gpus_spec):
    pass


def run_folds(data, paths, cfg, seed=42, force=False):
    pass


def run_submit(paths, message, cfg, csv=None, *, dry_run=False):
    pass


def run_clean(paths, data, cfg, *, skip_bad=False):
    pass
'''

FIXTURE_PAGE = """\
## Shared
- `kit.fixture`: `KitError(message, problems)`, `atomic_write_{text,json}`, `progress()`.
- `kit.fixture.launch(args)`: tune --workers.
- `kit.fixture.no_such_helper` and `kit.nosuchpackage.thing`.

| stage | function | writes |
|---|---|---|
| folds | `kit.fixture.run_folds(data, paths, cfg, seed=42, force=False)` | `folds/folds.csv` |
| submit | `kit.fixture.run_submit(paths, message, csv=None, ...)` | records |
| submit | `kit.fixture.run_submit(paths, message, cfg, csv=None, *, dry_run=False)` | records |
| folds | `kit.fixture.run_folds(data, paths, cfg, seed=7)` | `folds/folds.csv` |
| clean | `kit.fixture.run_clean(data, paths, cfg)` | `kit/data/clean.py`, `kit/data/nope.py` |
| blend | `kit.fixture.Search(objective, cfg).fit(P, y, folds)`, `kit.fixture.Search(...).fit(X)` |

```
kit/
├── utils.py  paths.py  gone.py      shared
├── data/                raw folder
│   ├── clean.py         clean
│   └── missing.py       not there
└── conf/                defaults
```
"""


def test_the_design_check_finds_wrong_citations(tmp_path, monkeypatch):
    import sys
    import types

    fixture = types.ModuleType("kit.fixture")
    exec(compile(FIXTURE, "kit/fixture.py", "exec"), fixture.__dict__)
    monkeypatch.setitem(sys.modules, "kit.fixture", fixture)
    for name in ("kit/utils.py", "kit/paths.py", "kit/data/clean.py", "kit/conf/a.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    problems = "\n".join(check_design(FIXTURE_PAGE))
    expected = [
        "line 3: `kit.fixture.launch(args)`: no parameter 'args' (the code has paths there); "
        "required parameter(s) paths, kwargs, workers, gpus_spec not written (write them, or ... "
        "for what is left out) (the code: launch(paths, kwargs, workers, gpus_spec))",
        "line 4: `kit.fixture.no_such_helper`: kit.fixture has no 'no_such_helper'",
        "line 4: `kit.nosuchpackage.thing`: no module kit.nosuchpackage",
        "line 9: `kit.fixture.run_submit(paths, message, csv=None, ...)`: after 'message' the "
        "code has cfg, the page 'csv' (the code: run_submit(paths, message, cfg, csv=None, *, "
        "dry_run=False))",
        "line 11: `kit.fixture.run_folds(data, paths, cfg, seed=7)`: seed=7 but the default is 42",
        "line 12: `kit.fixture.run_clean(data, paths, cfg)`: first the code has paths, the page "
        "'data'; 'paths' is out of order",
        "line 12: `kit/data/nope.py`: no such file or folder",
        "line 13: `fit(X)`: no parameter 'X' (the code has P there); required parameter(s) P, y, "
        "folds not written",
        "line 17: `kit/gone.py`: no such file or folder",
        "line 20: `kit/data/missing.py`: no such file or folder",
    ]
    for words in expected:
        assert words in problems, f"{words!r} not in:\n{problems}"
    # and nothing else: what is right (lines 2, 8, 10, 13's first call, the tree's others)
    assert len(problems.split("\n")) == len(expected), problems


@pytest.mark.parametrize("page", [p for p in markdown_pages() if p != DESIGN], ids=rel)
def test_other_pages_cite_modules_and_files_that_exist(page):
    prose, blocks = split_fences(page.read_text())
    spans = code_spans(prose) + [(start + i, line) for start, block in blocks
                                 for i, line in enumerate(block)]
    problems = []
    for n, span in spans:
        for name in DOTTED.findall(span):
            try:
                resolve(name.rstrip("."))
            except LookupError as exc:
                problems.append(f"line {n}: `{name}`: {exc}")
        problems += [f"line {n}: `{p}`: no such file or folder" for p in KIT_PATH.findall(span)
                     if not path_exists(p)]
    assert not problems, f"{rel(page)} cites what the code does not have:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- commands
COMMAND = re.compile(r"(?:\./run\.sh|an2dl-kit)\s+([a-z][\w-]*)(?:\s+([a-z][\w-]*))?")


def command_lines(text: str) -> list[tuple[int, str]]:
    """Where a page writes commands: its inline code spans and its fenced blocks (a layout
    tree's prose excepted)."""
    prose, blocks = split_fences(text)
    return code_spans(prose) + [(start + i, line) for start, block in blocks
                                if not any("├" in line for line in block)
                                for i, line in enumerate(block)]


def command_problems(text: str) -> list[str]:
    """``line N: ...`` for each ``./run.sh X`` / ``an2dl-kit X`` (``bench Y``) of Markdown
    ``text`` that names no command (no benchmark)."""
    from kit.cli import COMMANDS
    from kit.commands.bench import BENCHES

    commands = {*COMMANDS, "test", "kaggle"}  # run.sh's own two (kit/console.py's too)
    problems = []
    for n, line in command_lines(text):
        for m in COMMAND.finditer(line):
            what, sub = m.groups()
            if what not in commands:
                problems.append(f"line {n}: no command {what!r} in `{m.group()}`")
            elif what == "bench" and sub and sub not in BENCHES:
                problems.append(f"line {n}: no bench {sub!r} in `{m.group()}`")
    return problems


def test_the_command_check_finds_unknown_commands():
    page = """\
Run `./run.sh cv phikon`, then `./run.sh train phikon` and `an2dl-kit bench noise`.

```bash
./run.sh bench regions --preset standard
./run.sh bench speed
./run.sh test tests/test_cv.py
```
```
kit/
├── commands/            one module per ./run.sh command: add_arguments, run
```
"""
    assert command_problems(page) == ["line 1: no command 'train' in `./run.sh train phikon`",
                                      "line 5: no bench 'speed' in `./run.sh bench speed`"]


@pytest.mark.parametrize("page", markdown_pages(), ids=rel)
def test_pages_name_only_commands_that_exist(page):
    problems = command_problems(page.read_text())
    assert not problems, f"{rel(page)}:\n" + "\n".join(problems)


def test_help_lists_every_command_and_every_bench():
    """README: `./run.sh --help` lists every command (and bench's line, every benchmark)."""
    import sys

    from kit.cli import COMMANDS
    from kit.commands.bench import BENCHES

    out = subprocess.run([sys.executable, "-m", "kit", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    listed = {line.split()[0]: line for line in out.splitlines()
              if line.startswith("    ") and line.split()}
    assert set(COMMANDS) <= set(listed), f"not in ./run.sh --help: {set(COMMANDS) - set(listed)}"
    assert "./run.sh test" in out and "./run.sh kaggle" in out
    missing = [b for b in BENCHES if not re.search(rf"\b{b}\b", listed["bench"])]
    assert not missing, (f"./run.sh --help's bench line ({listed['bench'].strip()!r}, "
                         f"kit/cli.py COMMANDS['bench']) leaves out {', '.join(missing)}")
