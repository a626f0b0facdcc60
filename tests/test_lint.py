"""ruff, configured in pyproject.toml's [tool.ruff], finds nothing in the repository, and that
configuration is the one in force (line length 100, import order with kit first-party)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ruff() -> str:
    beside = Path(sys.executable).with_name("ruff")
    found = str(beside) if beside.exists() else shutil.which("ruff")
    if found:
        return found
    msg = f"ruff (the dev extra) is installed neither beside {sys.executable} nor on PATH"
    # Under CI a missing linter is a broken environment, not a pass (as for PostgreSQL,
    # chromium and import-linter).
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must provide ruff: {msg}")
    pytest.skip(msg)


def _check(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([_ruff(), "check", "--no-cache", "--output-format", "concise", *args],
                          cwd=REPO, input=stdin, capture_output=True, text=True, timeout=300)


def _codes(source: str, name: str = "kit/_planted.py") -> set[str]:
    """The rule codes ruff reports for ``source`` checked as the file ``name`` of the repo."""
    proc = _check("--stdin-filename", name, "-", stdin=source)
    return {line.split(" ", 2)[1] for line in proc.stdout.splitlines() if ": " in line
            and line.startswith(name)}


def test_ruff_finds_nothing_in_the_repository():
    proc = _check(".")
    assert proc.returncode == 0, (
        "ruff check . found problems (fix them, `.venv/bin/ruff check . --fix` does the import "
        "order):\n" + proc.stdout[-4000:] + proc.stderr[-1000:])


def test_the_repository_configuration_is_in_force():
    ok = "import os\n\nimport numpy as np\n\nimport kit\n\nprint(os, np, kit)\n"
    assert _codes(ok) == set()
    # kit is first-party: sorted after the third-party block, not among it
    mixed = "import os\n\nimport kit\nimport numpy as np\n\nprint(os, np, kit)\n"
    assert _codes(mixed) == {"I001"}
    # so are the test helpers imported as top-level modules
    helpers = "import pytest\n\nfrom cv_data import make_workdir\n\nprint(pytest, make_workdir)\n"
    assert _codes(helpers, "tests/test_planted.py") == set()
    # line length 100, not ruff's default 88
    assert _codes(f"x = '{'a' * 94}'\n") == set()  # 100 characters
    assert _codes(f"x = '{'a' * 95}'\n") == {"E501"}
    # pyflakes and bugbear are on
    assert _codes("import os\n") == {"F401"}
    assert _codes("def f(x=[]):\n    return x\n") == {"B006"}
