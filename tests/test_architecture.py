"""The shape of kit/: the import layers of .importlinter hold, and no module imports itself
back through others (no import cycle), lazy imports included."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / ".importlinter")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def _graph(root: Path):
    import grimp

    sys.path.insert(0, str(root))
    try:
        return grimp.build_graph("kit", cache_dir=None)
    finally:
        sys.path.remove(str(root))


@pytest.fixture(scope="module")
def lint_available():
    if not LINT.exists():
        msg = f"lint-imports (import-linter, the dev extra) is not beside {sys.executable}"
        # Under CI a missing checker is a broken environment, not a reason to pass (as for the
        # PostgreSQL and chromium tests).
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must provide import-linter: {msg}")
        pytest.skip(msg)


def test_the_import_layers_hold(lint_available):
    proc = _lint(REPO)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "BROKEN" not in proc.stdout


def test_a_planted_upward_import_breaks_the_contract(lint_available, tmp_path):
    shutil.copytree(REPO / "kit", tmp_path / "kit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    heads = tmp_path / "kit" / "models" / "heads.py"
    planted = "\n\ndef _planted():\n    from kit.training import cv  # noqa\n"
    heads.write_text(heads.read_text() + planted)
    proc = _lint(tmp_path)
    assert proc.returncode != 0 and "kit.models.heads -> kit.training.cv" in proc.stdout


def test_no_module_imports_itself_through_others(lint_available):
    graph = _graph(REPO)
    assert len(graph.modules) > 50 and "kit.training.train" in graph.modules
    cycles = []
    for module in sorted(graph.modules):
        for other in graph.find_modules_directly_imported_by(module):
            if graph.chain_exists(importer=other, imported=module):
                cycles.append((module, other))
    assert not cycles, f"import cycles: {cycles[:5]}"
