#!/usr/bin/env python3
"""Regroup ``kit/`` into subpackages whose folder tree reads as the pipeline (issue 11).

Not applied yet: verified on worktrees of main (full suite green on 7928546: 602 passed),
to be run once on main when nothing else is editing or running it; then delete this file.

Run in the root of a git checkout of an2dl-kit::

    python3 tools/relayout.py            # do it (git mv + rewrite every reference)
    python3 tools/relayout.py --dry-run  # only say what would move / change
    python3 tools/relayout.py --check .venv/bin/python   # afterwards: import every
                                                  # module and grep for old paths

What it does, in order:

1. refuses unless the checkout is exactly in the "before" state (every old module present,
   no new one), or says "already applied" and exits 0 when it is exactly in the "after"
   state; refuses a dirty worktree (``--allow-dirty`` to override) and any ``kit/*.py`` that
   the table below does not place (a module added since: decide where it goes first);
2. ``git mv`` of each module of MAPPING into its subpackage;
3. rewrites every reference in every tracked text file (code, tests, docs, notebooks,
   conf comments, pyproject, .ci, run.sh): ``from kit.X import``, ``import kit.X``,
   ``kit.X.attr`` (also inside strings: monkeypatch targets, ``python -m kit.X``),
   ``:mod:``/``:func:`` references, ``kit/X.py`` paths, and ``from kit import X[, Y]``
   (split per subpackage, aliased when a module is renamed); lazy imports included;
4. in moved modules, ``Path(__file__)...parent.parent`` (the repository root) becomes
   ``parents[2]``; any other ``__file__`` use there is listed for review;
5. writes ``kit/<pkg>/__init__.py`` (one docstring paragraph each), checks pyproject's
   package discovery (``kit.*``) and package data (``conf/*.yaml``), rewrites README's
   ``kit/`` layout bullet and adds (or replaces) the "Layout: before and after" section of
   docs/DESIGN.md, drawn from MAPPING;
6. ``git add`` of the result (nothing is committed).
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

# --------------------------------------------------------------------------------------------
# THE MAPPING: old module (kit/<old>.py) -> new dotted path under kit, and a one-line role
# (drawn in docs/DESIGN.md's tree). Order within a package = order in the drawn tree.
SELF = "tools/relayout.py"  # this script: its table names the old modules, never rewritten
MAPPING = [
    # old              new                         role
    ("data",          "data.dataset",          "load and validate the challenge layout"),
    ("clean",         "data.clean",            "junk detection -> folds/outliers.csv, review page"),
    ("neardup",       "data.neardup",          "perceptual hashes, near-duplicate groups"),
    ("patches",       "data.patches",          "top-K mask-coverage patches -> runs/patches/"),
    ("stain",         "data.stain",            "Macenko stain normalisation of patches"),
    ("folds",         "data.folds",            "stratified, grouped K folds -> folds/folds.csv"),
    ("synth",         "data.synth",            "the one synthetic-data generator"),
    ("demo",          "data.demo",             "the demo dataset (synth's demo preset)"),
    ("backbones",     "models.backbones",      "backbone registry, creation, freezing"),
    ("weights",       "models.weights",        "--weights lookup and strict loading"),
    ("heads",         "models.heads",          "patch MLP and attention-MIL heads"),
    ("cv",            "training.cv",           "one model per fold -> runs/<bb>/"),
    ("train",         "training.train",        "the one loop fit(), predict, checkpoints"),
    ("features",      "training.features",     "embedding cache; heads on cached embeddings"),
    ("augment",       "training.augment",      "augmentation, normalisation, CutMix, balance"),
    ("tta",           "training.tta",          "test-time views"),
    ("params",        "training.params",       "cv --params: tuned keys valid on this path"),
    ("tune",          "tuning.tune",           "Optuna studies -> runs/tune/<bb>/best.yaml"),
    ("search_space",  "tuning.search_space",   "search spaces declared in YAML"),
    ("tune_storage",  "tuning.storage",        "where studies live (SQLite, RDB, journal)"),
    ("tune_workers",  "tuning.workers",        "tune --workers/--gpus: one process per GPU"),
    ("blend_search",  "ensemble.search",       "BlendSearch: weights + class biases, on arrays"),
    ("blend",         "ensemble.blend",        "input checks, provenance -> submissions/"),
    ("package",       "submission.package",    "submission CSV checks, manifest"),
    ("submit",        "submission.submit",     "upload to Kaggle, upload records"),
    ("reproduce",     "submission.reproduce",  "re-run a blend, compare bytes"),
    ("report",        "submission.report",     "runs/report.html over every stage's files"),
]

# Modules that stay at kit/ (shared by every stage, or entry points).
KEEP = {
    "__init__": "CLASSES, PROB_COLUMNS, __version__",
    "__main__": "python -m kit",
    "cli": "command table, argument parsing",
    "console": "an2dl-kit (adds test, kaggle)",
    "env_check": "KIT_PYTHON=... floors (stdlib only)",
    "config": "load_config: kit/conf/<group>.yaml + overrides",
    "paths": "Paths: every file location",
    "utils": "KitError, atomic writes, seeds, progress",
    "metrics": "aggregate, macro F1 (every stage)",
}
# Folders that stay at kit/.
KEEP_DIRS = {
    "commands": "one module per ./run.sh command: add_arguments, run",
    "bench": "./run.sh bench <what>",
    "conf": "default settings, one YAML per stage",
}

# Subpackages in pipeline order, each with its __init__.py docstring (one paragraph).
PACKAGES = {
    "data": (
        "raw folder -> clean list, patches, folds",
        """Data: from the raw challenge folder to what training reads.

:mod:`kit.data.dataset` loads and validates the challenge layout (``validate``);
:mod:`kit.data.clean` flags junk training images (``folds/outliers.csv``, the review page)
and groups near-duplicates with :mod:`kit.data.neardup`'s perceptual hashes;
:mod:`kit.data.patches` cuts the top-K mask-coverage patches of every image into a cached
array (stain-normalised by :mod:`kit.data.stain` on request); :mod:`kit.data.folds` writes the
stratified, image-grouped split ``folds/folds.csv``. :mod:`kit.data.synth` is the kit's one
synthetic-data generator (the demo's dataset through :mod:`kit.data.demo`, the benches, the
tests). Nothing here builds or trains a model.
"""),
    "models": (
        "what a patch goes through",
        """Models: the networks a patch goes through, built but not trained here.

:mod:`kit.models.backbones` is the registry of feature extractors (timm CNNs and ViTs,
Hugging Face and pathology foundation models: creation, input size and normalisation,
freezing, BatchNorm recalibration), created with the weights :mod:`kit.models.weights` finds
(``--weights auto|PATH|random``: local folders, the Hugging Face and torch caches, a hub
download; strict loading). :mod:`kit.models.heads` holds the classification heads put on a
backbone: a patch MLP, or attention MIL over an image's patches.
"""),
    "training": (
        "cv: one model per fold, scored out of fold",
        """Training: the ``cv`` stage, one model per fold, scored out of fold.

:mod:`kit.training.cv` reads the patch cache and the folds and trains every fold with the
kit's one loop, :func:`kit.training.train.fit`: on pixels (:mod:`kit.training.augment`'s
pipeline, CutMix, class balance) or, when nothing in the backbone trains, on the embedding
cache of :mod:`kit.training.features`. Predictions average :mod:`kit.training.tta`'s views;
the outputs are ``runs/<bb>/`` (OOF and test probabilities, metrics, checkpoints).
:mod:`kit.training.params` decides which keys of a tuned ``best.yaml`` (``cv --params``)
apply to the training path at hand.
"""),
    "tuning": (
        "tune: Optuna search on top of training",
        """Tuning: the ``tune`` stage, an Optuna search of head and augmentation settings per
backbone, on top of training's loop and embedding cache.

:mod:`kit.tuning.tune` runs a study over the space :mod:`kit.tuning.search_space` declares
(YAML, one place per backbone) and writes ``runs/tune/<bb>/best.yaml`` for ``cv --params``;
:mod:`kit.tuning.storage` says where studies live (SQLite, an RDB URL, a journal file) and
:mod:`kit.tuning.workers` runs one worker process per GPU on one storage
(``tune --workers/--gpus``).
"""),
    "ensemble": (
        "blend: backbones -> one set of test probabilities",
        """Ensemble: the ``blend`` stage, from several backbones' probabilities to one.

:mod:`kit.ensemble.search` fits the blend on arrays: :class:`~kit.ensemble.search.BlendSearch`,
a scikit-learn-style estimator, finds weights over the backbones' OOF probabilities and
per-class biases, scored nested (fold by fold) besides in sample. :mod:`kit.ensemble.blend`
checks the inputs under ``runs/``, runs the search, applies it to the test probabilities,
records the provenance and hands the labels to :mod:`kit.submission.package`, which writes
the validated submission file and its manifest.
"""),
    "submission": (
        "what leaves the kit, and its record",
        """Submission: what leaves the kit, and the record that makes it reproducible.

:mod:`kit.submission.package` writes the submission CSV (validated before it exists) and its
manifest; :mod:`kit.submission.submit` uploads it to Kaggle and records each upload;
:mod:`kit.submission.reproduce` re-runs a blend from its manifest and compares bytes;
:mod:`kit.submission.report` writes ``runs/report.html`` from every stage's files.
"""),
}
# Import direction: a subpackage may import the shared top-level modules and the
# subpackages before it in this order; commands and bench come last (they import all).
ORDER = list(PACKAGES) + ["commands", "bench"]

DESIGN_HEADING = "## Layout: before and after"
README_BULLET_START = "- `kit/`: the Python package"
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".toml", ".txt", ".yaml", ".yml", ".sh", ".cfg",
                 ".ini", ".json", ""}
MAX_LINE = 100
# --------------------------------------------------------------------------------------------

OLD = {old: new for old, new, _ in MAPPING}
ROLE = {old: role for old, _, role in MAPPING}
NAMES = "|".join(sorted(OLD, key=len, reverse=True))
# kit.<old> as a dotted path (code, strings, docs); not part of a longer dotted name.
DOTTED = re.compile(rf"(?<![\w.\-/])kit\.(?P<m>{NAMES})(?!\w)")
# kit/<old>.py as a file path.
SLASHED = re.compile(rf"(?<![\w.\-/])kit/(?P<m>{NAMES})\.py\b")
# from kit import a, b as c   /   from kit import (a,\n b)   [# comment]
FROM_KIT = re.compile(r"^(?P<indent>[ \t]*)from kit import (?P<names>\([^)]*\)|[^\n#(]*?)"
                      r"(?P<comment>[ \t]*#[^\n]*)?$", re.M)
FROM_KIT_NB = re.compile(r'(?P<pre>"[ \t]*)from kit import (?P<names>[\w ,]+?)(?P<post>\\n"|")')


class Refuse(SystemExit):
    def __init__(self, msg):
        super().__init__(f"relayout: {msg}")


def git(*args, capture=True):
    r = subprocess.run(["git", *args], capture_output=capture, text=True)
    if r.returncode:
        raise Refuse(f"git {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def new_file(old: str) -> str:
    return "kit/" + OLD[old].replace(".", "/") + ".py"


def state() -> str:
    old_present = [o for o in OLD if Path(f"kit/{o}.py").exists()]
    new_present = [o for o in OLD if Path(new_file(o)).exists()]
    if len(old_present) == len(OLD) and not new_present:
        return "before"
    if not old_present and len(new_present) == len(OLD):
        return "after"
    raise Refuse("the checkout is half relaid out; old modules present: "
                 f"{old_present or 'none'}; new modules present: "
                 f"{[new_file(o) for o in new_present] or 'none'}. Reset it (git checkout/"
                 "git reset --hard on a scratch worktree) and run again.")


# ------------------------------------------------------------------------------ rewriting
def _split_names(text: str) -> list[tuple[str, str | None]]:
    text = text.strip()
    if text.startswith("("):
        text = text[1:-1]
    text = re.sub(r"#[^\n]*", "", text)
    out = []
    for part in text.replace("\n", " ").split(","):
        part = part.strip()
        if not part:
            continue
        bits = part.split()
        if len(bits) == 3 and bits[1] == "as":
            out.append((bits[0], bits[2]))
        elif len(bits) == 1:
            out.append((bits[0], None))
        else:
            raise ValueError(part)
    return out


def _fmt(name, alias):
    return f"{name} as {alias}" if alias else name


def _rewrite_from_kit(m: re.Match) -> str:
    indent, comment = m["indent"], m["comment"] or ""
    try:
        names = _split_names(m["names"])
    except ValueError:  # not an import statement (prose); --check lists what is left
        return m.group(0)
    if not any(n in OLD for n, _ in names):
        return m.group(0)
    kept = [_fmt(n, a) for n, a in names if n not in OLD]
    by_pkg: dict[str, list[str]] = {}
    for n, a in names:
        if n in OLD:
            pkg, _, mod = OLD[n].rpartition(".")
            alias = a or (n if mod != n else None)
            by_pkg.setdefault(pkg, []).append(_fmt(mod, alias))
    lines = []
    if kept:
        lines.append(f"{indent}from kit import {', '.join(kept)}")
    for pkg, mods in by_pkg.items():
        lines.append(f"{indent}from kit.{pkg} import {', '.join(mods)}")
    lines[0] += comment
    return "\n".join(wrap_import(line) for line in lines)


def _rewrite_from_kit_nb(m: re.Match) -> str:
    try:
        names = _split_names(m["names"])
    except ValueError:
        return m.group(0)
    if not any(n in OLD for n, _ in names):
        return m.group(0)
    pkgs = {OLD[n].rpartition(".")[0] for n, _ in names if n in OLD}
    if len(pkgs) > 1 or any(n not in OLD for n, _ in names):
        raise Refuse(f"notebook line {m.group(0)!r} mixes packages: edit it by hand first")
    pkg = pkgs.pop()
    mods = []
    for n, a in names:
        mod = OLD[n].rpartition(".")[2]
        mods.append(_fmt(mod, a or (n if mod != n else None)))
    return f"{m['pre']}from kit.{pkg} import {', '.join(mods)}{m['post']}"


def wrap_import(line: str) -> str:
    """Wrap a one-line ``from X import a, b`` over MAX_LINE as the kit does: in parentheses,
    continuation lines aligned after the parenthesis."""
    m = re.fullmatch(r"(?P<head>[ \t]*from [\w.]+ import )(?P<names>[\w ,]+)", line)
    if len(line) <= MAX_LINE or not m:
        return line
    head, names = m["head"] + "(", [n.strip() for n in m["names"].split(",")]
    lines, cur = [], head
    for i, name in enumerate(names):
        piece = name + ("," if i < len(names) - 1 else ")")
        if cur.strip() and not cur.endswith("(") and len(cur) + 1 + len(piece) > MAX_LINE:
            lines.append(cur.rstrip())
            cur = " " * len(head)
        cur += ("" if cur.endswith("(") or not cur.strip() else " ") + piece
    lines.append(cur)
    return "\n".join(lines)


def rewrite_text(path: str, text: str) -> str:
    original = set(text.split("\n"))
    # dotted and slashed paths first: the "from kit import" rewrite below writes new dotted
    # paths (from kit.data import clean) that must not be rewritten again
    text = SLASHED.sub(lambda m: new_file(m["m"]), text)
    text = DOTTED.sub(lambda m: "kit." + OLD[m["m"]], text)
    if path.endswith(".ipynb"):
        text = FROM_KIT_NB.sub(_rewrite_from_kit_nb, text)
    elif path.endswith((".py", ".md")):
        text = FROM_KIT.sub(_rewrite_from_kit, text)
    if path.endswith(".py"):  # re-wrap import statements the rewrite made too long
        text = PAREN_IMPORT.sub(_reflow_paren_import, text)
        text = "\n".join(wrap_import(l) if (l not in original and len(l) > MAX_LINE) else l
                         for l in text.split("\n"))
    return text


PAREN_IMPORT = re.compile(r"^(?P<head>[ \t]*from kit\.[\w.]+ import )\((?P<names>[^)#]*)\)[ \t]*$",
                          re.M)


NEW_MODULES = {"kit." + n for n in OLD.values()} | {"kit." + p for p in PACKAGES}


def _reflow_paren_import(m: re.Match) -> str:
    """Re-wrap a parenthesised import of a moved module whose lines are now too long or no
    longer aligned after the parenthesis."""
    lines = m.group(0).split("\n")
    module = m["head"].split()[1]
    aligned = all(len(l) - len(l.lstrip()) == len(m["head"]) + 1 for l in lines[1:] if l.strip())
    if module not in NEW_MODULES or (aligned and all(len(l) <= MAX_LINE for l in lines)):
        return m.group(0)
    names = ", ".join(n.strip() for n in m["names"].replace("\n", " ").split(",") if n.strip())
    return wrap_import(m["head"] + names)


# __file__ uses in moved modules that do not depend on the folder depth.
FILE_USES_OK = (r"parents\[2\]",                        # fixed just above
                r"Path\(__file__\)\.read_bytes\(\)",     # synth: hash of its own source
                r"pkg\.__file__ = spec")                  # submit: a module spec, not a path


def fix_file_paths(path: str, text: str, review: list[str]) -> str:
    """A moved module is one folder deeper: its Path(__file__) walks to the repository root
    need one more step."""
    for pat, rep in ((r"Path\(__file__\)\.resolve\(\)\.parent\.parent\b(?!\.)",
                      "Path(__file__).resolve().parents[2]"),
                     (r"Path\(__file__\)\.parent\.parent\b(?!\.)",
                      "Path(__file__).parents[2]")):
        text = re.sub(pat, rep, text)
    for i, line in enumerate(text.split("\n"), 1):
        if "__file__" in line and not any(re.search(ok, line) for ok in FILE_USES_OK):
            review.append(f"{path}:{i}: {line.strip()}")
    return text


def is_text(path: Path) -> bool:
    if path.suffix not in TEXT_SUFFIXES or not path.is_file() or path.is_symlink():
        return False
    data = path.read_bytes()
    return b"\0" not in data[:8192]


# ------------------------------------------------------------------------------ drawings
def _grid(names: list[str], prefix: str, width: int = 88) -> list[str]:
    lines, cur = [], ""
    for n in names:
        if cur and len(prefix) + len(cur) + 2 + len(n) > width:
            lines.append(prefix + cur)
            cur = ""
        cur = f"{cur}  {n}" if cur else n
    if cur:
        lines.append(prefix + cur)
    return lines


def before_tree(modules: list[str]) -> str:
    flat = [f"{m}.py" for m in modules]
    lines = ["kit/"]
    lines += _grid(flat, "│   ")
    dirs = sorted(KEEP_DIRS)
    for i, d in enumerate(dirs):
        lines.append(("└── " if i == len(dirs) - 1 else "├── ") + f"{d}/")
    return "\n".join(lines)


def after_tree() -> str:
    entry = [m for m in ("__init__", "__main__", "cli", "console", "env_check") if m in KEEP]
    shared = [m for m in ("config", "paths", "utils", "metrics") if m in KEEP]
    head = ["kit/",
            "├── " + "  ".join(f"{m}.py" for m in entry) + "   entry points",
            "├── " + "  ".join(f"{m}.py" for m in shared) + "   shared by every step"]
    rows = [("├── conf/", KEEP_DIRS["conf"])]
    for pkg, (summary, _) in PACKAGES.items():
        rows.append((f"├── {pkg}/", summary))
        mods = [(o, n) for o, n, _ in MAPPING if n.startswith(pkg + ".")]
        for i, (o, n) in enumerate(mods):
            leaf = n.rpartition(".")[2] + ".py"
            was = f"(was {o}.py) " if leaf != f"{o}.py" else ""
            rows.append(("│   " + ("└── " if i == len(mods) - 1 else "├── ") + leaf,
                         was + ROLE[o]))
    rows.append(("├── commands/", KEEP_DIRS["commands"]))
    rows.append(("└── bench/", KEEP_DIRS["bench"]))
    width = max(len(a) for a, _ in rows) + 2
    return "\n".join(head + [(a.ljust(width) + b).rstrip() for a, b in rows])


def package_edges() -> list[str]:
    """Imports between subpackages (lazy ones included) after the move; the back-edges go
    against ORDER."""
    def group(mod: str):
        parts = mod.split(".")
        if parts[0] != "kit" or len(parts) < 2:
            return None
        return parts[1] if parts[1] in ORDER else None

    back = []
    for f in sorted(Path("kit").rglob("*.py")):
        src = group(".".join(f.with_suffix("").parts))
        if src is None:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = ([f"kit.{a.name}" for a in node.names] if node.module == "kit"
                           else [node.module])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                dst = group(t)
                if dst and dst != src and ORDER.index(dst) > ORDER.index(src):
                    back.append(f"`{'.'.join(f.with_suffix('').parts)}` imports `{t}`")
    return sorted(set(back))


def design_section(old_modules: list[str], back: list[str]) -> str:
    arrow = " -> ".join(PACKAGES)
    text = [DESIGN_HEADING, "",
            f"Before: one flat package of {len(old_modules)} modules, one per stage or "
            "helper; the pipeline", "showed only in the stage table below.", "", "```", before_tree(old_modules), "```", "",
            *textwrap.wrap(
                "After: one subpackage per pipeline step, in the order data flows "
                f"({arrow}); the modules every step uses stay at `kit/`, and the entry points "
                "(`cli`, `commands/`) stay thin: they parse options and call one stage "
                "function.", width=92),
            "", "```", after_tree(), "```", "",
            "A subpackage imports the shared top-level modules and the subpackages before "
            "it in this",
            "order (commands and bench import all of them). Lazy imports against that order, "
            "left as", "they were:"]
    text += [f"- {b}" for b in back] or ["- none"]
    rows = ["", "| before | after |", "|---|---|"]
    rows += [f"| `kit/{o}.py` | `{new_file(o)}` |" for o, _, _ in MAPPING]
    return "\n".join(text + rows) + "\n"


def update_design(back: list[str], old_modules: list[str]) -> None:
    p = Path("docs/DESIGN.md")
    text = p.read_text()
    section = design_section(old_modules, back)
    if DESIGN_HEADING in text:  # replace up to the next "## " heading
        start = text.index(DESIGN_HEADING)
        nxt = text.find("\n## ", start + len(DESIGN_HEADING))
        text = text[:start] + section + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
    else:  # before the first "## " section, after the data-flow drawing
        first = text.find("\n## ")
        if first < 0:
            text = text.rstrip("\n") + "\n\n" + section
        else:
            text = text[:first + 1] + section + "\n" + text[first + 1:]
    p.write_text(text)


def update_readme(notes: list[str]) -> None:
    p = Path("README.md")
    lines = p.read_text().split("\n")
    try:
        start = next(i for i, l in enumerate(lines) if l.startswith(README_BULLET_START))
    except StopIteration:
        notes.append("README.md: no '- `kit/`: the Python package' bullet found; describe "
                     "the new layout there by hand")
        return
    end = start + 1
    while end < len(lines) and lines[end].startswith("  "):
        end += 1
    pk = "; ".join(f"`{p}/` ({', '.join(n.rpartition('.')[2] for o, n, _ in MAPPING if n.startswith(p + '.'))})"
                   for p in PACKAGES)
    text = ("- `kit/`: the Python package, one subpackage per pipeline step: " + pk +
            "; shared modules (`config`, `paths`, `utils`, `metrics`) and the entry points "
            "(`cli`, `console`, `env_check`) at the top; `kit/commands/` one module per CLI "
            "command; `kit/bench/` the benchmarks; `kit/conf/` the default settings. "
            "`docs/DESIGN.md` draws the tree.")
    new = textwrap.wrap(text, width=95, subsequent_indent="  ", break_on_hyphens=False,
                        break_long_words=False)
    lines[start:end] = new
    p.write_text("\n".join(lines))


def unignore_packages(notes: list[str]) -> list[str]:
    """A .gitignore pattern such as ``data/`` (meant for the raw data folder) would also
    ignore ``kit/data/``: re-include each subpackage right after the pattern that hides it."""
    added = []
    for pkg in PACKAGES:
        r = subprocess.run(["git", "check-ignore", "-v", "--no-index", f"kit/{pkg}/__init__.py"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            continue
        source, line, pattern = re.match(r"([^:]+):(\d+):([^\t]*)\t", r.stdout).groups()
        if source != ".gitignore":
            notes.append(f"kit/{pkg}/ is ignored by {source}:{line} ({pattern}); re-include it")
            continue
        lines = Path(".gitignore").read_text().split("\n")
        lines.insert(int(line), f"!kit/{pkg}/")
        Path(".gitignore").write_text("\n".join(lines))
        added.append(f".gitignore: '{pattern}' hid kit/{pkg}/; added '!kit/{pkg}/' after it")
    return added


def check_pyproject(notes: list[str]) -> None:
    p = Path("pyproject.toml")
    text = p.read_text()
    m = re.search(r"\[tool\.setuptools\.packages\.find\]\s*\ninclude\s*=\s*\[(?P<l>[^\]]*)\]",
                  text)
    if m is None:
        if "[tool.setuptools.packages.find]" in text or "packages = " in text:
            notes.append("pyproject.toml: package discovery is not the expected "
                         "`include = [\"kit\", \"kit.*\"]`; make sure it finds kit.* subpackages")
        else:
            text += '\n[tool.setuptools.packages.find]\ninclude = ["kit", "kit.*"]\n'
    elif '"kit.*"' not in m["l"]:
        text = text[:m.start("l")] + m["l"].rstrip() + ', "kit.*"' + text[m.end("l"):]
    if not re.search(r'\[tool\.setuptools\.package-data\]\s*\nkit\s*=\s*\[[^\]]*"conf/\*\.yaml"',
                     text):
        notes.append('pyproject.toml: package data should keep kit = ["conf/*.yaml"]')
    p.write_text(text)


# ------------------------------------------------------------------------------ check
LEFTOVER = re.compile(
    rf"(?<![\w.\-/])kit[./](?P<m>{'|'.join(sorted((o for o in OLD if o not in PACKAGES), key=len, reverse=True))})(?![\w])"
    rf"|(?<![\w.\-/])kit\.data\.(?!(?:{'|'.join(n.rpartition('.')[2] for n in OLD.values() if n.startswith('data.'))})\b)\w+"
    rf"|(?<![\w.\-/])kit/data\.py\b"
    rf"|from kit\.data import (?!(?:{'|'.join(n.rpartition('.')[2] for n in OLD.values() if n.startswith('data.'))})\b)"
    rf"|from kit import [^\n]*\b(?:{NAMES})\b")


def leftovers(files: list[str]) -> list[str]:
    hits = []
    for f in files:
        p = Path(f)
        if not is_text(p):
            continue
        inside = False  # DESIGN's layout section names the old paths on purpose
        for i, line in enumerate(p.read_text(errors="replace").split("\n"), 1):
            if line.startswith("## "):
                inside = line.startswith(DESIGN_HEADING)
            if not inside and LEFTOVER.search(line):
                hits.append(f"{f}:{i}: {line.strip()}")
    return hits


def check(python: str) -> int:
    mods = ["kit"] + [f"kit.{p}" for p in PACKAGES] + [f"kit.{n}" for n in OLD.values()]
    mods += [f"kit.{m}" for m in KEEP if m not in ("__init__", "__main__")]
    mods += ["kit." + ".".join(p.with_suffix("").parts[1:])
             for d in ("commands", "bench") for p in sorted(Path("kit", d).glob("*.py"))
             if p.stem != "__init__"]
    code = ("import importlib, sys\nbad = []\nfor m in sys.argv[1:]:\n    try:\n"
            "        importlib.import_module(m)\n    except Exception as e:\n"
            "        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(bad) or f'imported {len(sys.argv) - 1} modules')\n"
            "sys.exit(1 if bad else 0)\n")
    r = subprocess.run([python, "-c", code, *mods])
    hits = leftovers([f for f in git("ls-files").split("\n") if f != SELF])
    print("\n".join(["old module paths left:"] + hits) if hits else "no old module path left")
    return 1 if r.returncode or hits else 0


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="say what would change; touch nothing")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="run on a worktree with uncommitted changes")
    ap.add_argument("--check", metavar="PYTHON",
                    help="after a relayout: import every module with PYTHON, grep old paths")
    args = ap.parse_args(argv)
    if not (Path("kit/__init__.py").is_file() and Path(".git").exists()):
        raise Refuse("run me in the root of an an2dl-kit git checkout (kit/__init__.py, .git)")
    if args.check:
        return check(args.check)

    where = state()
    if where == "after":
        print("relayout: already applied (every module is in its subpackage); nothing to do")
        return 0
    flat = sorted(p.stem for p in Path("kit").glob("*.py"))
    unknown = [m for m in flat if m not in OLD and m not in KEEP]
    if unknown:
        raise Refuse(f"kit/ has modules the table does not place: {unknown}; add them to "
                     "MAPPING (or KEEP) first")
    clash = [p for p in PACKAGES if Path("kit", p).is_dir()]
    if clash:
        raise Refuse(f"kit/ already has folders {clash}")
    dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    if dirty and not args.allow_dirty and not args.dry_run:
        raise Refuse("the worktree has uncommitted changes (commit or stash them, or pass "
                     f"--allow-dirty):\n{dirty}")
    for o in OLD:
        text = Path(f"kit/{o}.py").read_text()
        if re.search(r"^\s*from \.", text, re.M):
            raise Refuse(f"kit/{o}.py uses a relative import; the table assumes none")

    old_modules = flat
    for o, n, _ in MAPPING:
        print(f"git mv kit/{o}.py {new_file(o)}")
    if args.dry_run:
        files = [f for f in git("ls-files").split("\n")
                 if f and f != SELF and is_text(Path(f))]
        for f in files:
            t = Path(f).read_text()
            if rewrite_text(f, t) != t:
                print(f"would rewrite {f}")
        return 0

    # 2. moves
    for pkg in PACKAGES:
        Path("kit", pkg).mkdir()
    for o, _, _ in MAPPING:
        git("mv", f"kit/{o}.py", new_file(o))
    moved = {new_file(o) for o in OLD}

    # 3-4. references
    changed, review, notes, long_lines = [], [], [], []
    for f in git("ls-files").split("\n"):
        p = Path(f)
        if not f or f == SELF or not is_text(p):
            continue
        before = p.read_text()
        after = rewrite_text(f, before)
        if f in moved:
            after = fix_file_paths(f, after, review)
        if after != before:
            p.write_text(after)
            changed.append(f)
            old_lines = set(before.split("\n"))
            long_lines += [f"{f}:{i}" for i, l in enumerate(after.split("\n"), 1)
                           if len(l) > MAX_LINE and l not in old_lines]
    untracked = [f for f in git("ls-files", "--others", "--exclude-standard").split("\n") if f]
    stale = leftovers(untracked)

    # 5. packages, pyproject, docs
    for pkg, (_, doc) in PACKAGES.items():
        Path("kit", pkg, "__init__.py").write_text(f'"""{doc.rstrip()}\n"""\n')
    notes += unignore_packages(notes)
    check_pyproject(notes)
    update_readme(notes)
    back = package_edges()
    update_design(back, old_modules)

    # 6. stage it
    inits = [f"kit/{pkg}/__init__.py" for pkg in PACKAGES]
    git("add", *inits, ".gitignore", "docs/DESIGN.md", "README.md", "pyproject.toml", *changed)
    print(f"\nrewrote references in {len(changed)} files:")
    print("  " + "\n  ".join(changed))
    if back:
        print("\nimports against the pipeline order (listed in docs/DESIGN.md):")
        print("  " + "\n  ".join(back))
    if review:
        print("\nreview by hand (__file__ in a moved module):")
        print("  " + "\n  ".join(review))
    if stale:
        print("\nuntracked files still naming old modules (not rewritten):")
        print("  " + "\n  ".join(stale))
    if long_lines:
        print(f"\n{len(long_lines)} rewritten lines are now over {MAX_LINE} characters (prose, "
              "comments, docstrings; wrap by hand if wanted; DESIGN.md line numbers are before its "
              "new section):")
        print("  " + "\n  ".join(long_lines))
    for n in notes:
        print("note:", n)
    print("\ndone; nothing committed. Check: python3 relayout.py --check .venv/bin/python, "
          "then the test suite.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
