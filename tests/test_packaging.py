"""Packaging: pyproject.toml (lower bounds, console script, dev extra) in step with the pins of
requirements.in, their full transitive lock requirements.txt (hashes, what ./run.sh installs)
and kit/env_check.py, and KIT_PYTHON=... ./run.sh in an existing environment (no .venv,
installs only what is missing, never another torch)."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

from kit import env_check
from kit.env_check import EnvError, at_least, check, parse_version, plan

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def split(req: str) -> tuple[str, str, str]:
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(==|>=)\s*([0-9][0-9A-Za-z.+\-]*)", req.strip())
    assert m, f"unexpected requirement form {req!r}"
    return m.group(1).lower(), m.group(2), m.group(3)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def direct() -> dict[str, str]:
    """requirements.in as name -> exact version (every line must be an exact pin)."""
    out = {}
    for line in (ROOT / "requirements.in").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, op, version = split(line)
            assert op == "==", f"requirements.in: {line!r} is not an exact pin"
            out[canonical(name)] = version
    return out


def lock() -> list[tuple[str, str, str, list[str]]]:
    """requirements.txt as (name, exact version, environment marker, sha256 hashes) entries.

    Every entry must be ``name==version [; marker]`` followed by its ``--hash`` lines (the
    form ``uv pip compile --generate-hashes`` writes); comments and blank lines are skipped.
    """
    text = (ROOT / "requirements.txt").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req, _, rest = line.partition(" --hash=")
        req, _, marker = req.partition(";")
        name, op, version = split(req)
        assert op == "==", f"requirements.txt: {line!r} is not an exact pin"
        hashes = re.findall(r"sha256:([0-9a-f]{64})", rest)
        assert hashes, f"requirements.txt: {name}=={version} has no --hash"
        out.append((canonical(name), version, marker.strip(), hashes))
    return out


# --------------------------------------------------------------------------- metadata
def test_pyproject_declares_the_package_script_and_dev_extra():
    project = pyproject()["project"]
    assert project["name"] == "an2dl-kit"
    assert project["scripts"] == {"an2dl-kit": "kit.console:main"}
    dev = {split(r)[0] for r in project["optional-dependencies"]["dev"]}
    assert {"pytest", "psycopg2-binary", "nbclient", "ipykernel"} <= dev
    assert pyproject()["tool"]["setuptools"]["package-data"]["kit"] == [
        "conf/*.yaml", "conf/presets/*.yaml", "conf/tasks/*.yaml"]
    assert list((ROOT / "kit" / "conf").glob("*.yaml"))
    assert list((ROOT / "kit" / "conf" / "presets").glob("*.yaml"))  # cv --config presets
    assert list((ROOT / "kit" / "conf" / "tasks").glob("*.yaml"))  # the built-in tasks


def test_dependencies_are_lower_bounds_equal_to_env_check():
    project = pyproject()["project"]
    deps = [split(r) for r in project["dependencies"]]
    dev = [split(r) for r in project["optional-dependencies"]["dev"]]
    assert all(op == ">=" for _, op, _ in deps + dev), "pyproject: lower bounds only, no pins"
    assert {n: v for n, _, v in deps} == {k.lower(): v for k, v in env_check.RUNTIME.items()}
    assert {n: v for n, _, v in dev} == {k.lower(): v for k, v in env_check.DEV.items()}


def test_requirements_in_pins_every_declared_package_within_its_range():
    pins = direct()
    project = pyproject()["project"]
    for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
        name, _, floor = split(req)
        name = canonical(name)
        assert name in pins, (f"{name} is declared in pyproject.toml but not pinned in "
                              "requirements.in")
        assert at_least(pins[name], floor), f"{name}=={pins[name]} is below pyproject's >={floor}"


def test_the_lock_is_generated_from_requirements_in_and_hashes_everything():
    """requirements.txt holds every pin of requirements.in at the same version, unconditionally
    (a changed pin needs a new lock: the refresh command is at the top of requirements.in)."""
    entries = lock()
    head = (ROOT / "requirements.txt").read_text().splitlines()[:3]
    assert any("uv pip compile requirements.in" in line and "--generate-hashes" in line
               for line in head), head
    locked = {}
    for name, version, marker, _ in entries:
        locked.setdefault(name, []).append((version, marker))
    for name, version in direct().items():
        assert locked.get(name) == [(version, "")], (
            f"requirements.in pins {name}=={version}, requirements.txt has {locked.get(name)}: "
            "regenerate the lock (see the top of requirements.in)")
    assert len(locked) > len(direct())  # transitive dependencies are locked too


def test_the_lock_is_closed_over_the_installed_dependencies():
    """Every dependency (for this platform) of a locked package is locked as well: the lock is
    the full transitive set, which is what pip install --require-hashes needs."""
    from packaging.markers import Marker
    from packaging.requirements import Requirement

    entries = lock()
    here = {name for name, _, marker, _ in entries if not marker or Marker(marker).evaluate()}
    names = {name for name, *_ in entries}
    missing = []
    for name in sorted(here):
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # not installed in this environment (KIT_PYTHON=...): nothing to check
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                if canonical(req.name) not in names:
                    missing.append(f"{req.name} (required by {name})")
    assert not missing, f"not in requirements.txt: {missing}"


def _optional(tree) -> set[int]:
    """ids of import nodes inside ``try: ... except ImportError``: optional, checked at use."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError",
                                                               "ModuleNotFoundError")
                for h in node.handlers):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def _third_party_imports() -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    names = set()
    for path in (ROOT / "kit").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        optional = _optional(tree)
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in stdlib and n not in ("kit", "__future__")}


def test_every_import_of_the_kit_is_declared():
    """A package the kit imports must come with ``pip install .``: declared, or a dependency
    of a declared one (sqlalchemy through optuna, requests through kaggle)."""
    declared = {split(r)[0] for r in pyproject()["project"]["dependencies"]}
    allowed = set(declared)
    for name in declared:
        for req in metadata.requires(name) or []:
            if "extra ==" not in req:
                dep = re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0]
                allowed.add(dep.lower().replace("_", "-"))
    dists = metadata.packages_distributions()
    missing = []
    for module in sorted(_third_party_imports()):
        owners = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        if not owners & allowed:
            missing.append(f"{module} ({', '.join(sorted(owners)) or 'not installed'})")
    assert not missing, f"imported by kit/ but not declared in pyproject.toml: {missing}"


# --------------------------------------------------------------------------- env_check
def test_parse_version_ignores_local_tags_and_trailing_zeros():
    assert parse_version("2.6.0+cu124") == (2, 6)
    assert parse_version("2.5") == parse_version("2.5.0")
    assert parse_version("1.0.15") > parse_version("1.0.9")  # numeric, not string order
    assert at_least("2.14.1", "2.5") and not at_least("2.4.1+cu121", "2.5")
    with pytest.raises(ValueError):
        parse_version("dev")


def fake(versions: dict):
    return lambda name: versions.get(name)


def test_check_sorts_ok_missing_and_old():
    reqs = {"torch": "2.5", "timm": "1.0.9", "optuna": "4.9", "imagehash": "4.3"}
    found = check(reqs, fake({"torch": "2.6.0+cu124", "timm": "1.0.3", "optuna": "4.9.0"}))
    assert found == {"ok": [("torch", "2.6.0+cu124"), ("optuna", "4.9.0")],
                     "missing": [("imagehash", "4.3")], "old": [("timm", "1.0.3", "1.0.9")]}
    assert plan(found) == ["imagehash>=4.3", "timm>=1.0.9"]
    line = env_check.summary("/opt/conda/bin/python", found, "installed imagehash>=4.3")
    assert "\n" not in line
    assert line.startswith("run.sh: KIT_PYTHON=/opt/conda/bin/python (Python 3.")
    assert "torch 2.6.0+cu124, timm 1.0.3 (too old); 1 other packages ok; installed" in line


@pytest.mark.parametrize("name", ["torch", "torchvision"])
def test_an_old_torch_is_never_replaced(name):
    found = check({name: "2.5" if name == "torch" else "0.20"},
                  fake({"torch": "2.1.0", "torchvision": "0.16.0"}))
    with pytest.raises(EnvError, match=f"never replaces an installed {name}"):
        plan(found)


def test_pip_runs_with_torch_held(monkeypatch):
    calls = []

    def run(cmd, **kwargs):
        cons = Path(cmd[cmd.index("-c") + 1]).read_text()
        calls.append((cmd, cons))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(env_check.subprocess, "run", run)
    held = env_check.constraints(fake({"torch": "2.6.0+cu124", "torchvision": "0.21.0+cu124"}))
    env_check.pip_install(["timm>=1.0.9"], held)
    (cmd, cons), = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and cmd[-1] == "timm>=1.0.9"
    assert cons.splitlines() == ["torch==2.6.0+cu124", "torchvision==0.21.0+cu124"]


def test_a_failed_pip_is_one_line(monkeypatch):
    out = ("Collecting timm\nERROR: Cannot install timm because these package versions have "
           "conflicting dependencies.\n")
    monkeypatch.setattr(env_check.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, out, ""))
    with pytest.raises(EnvError, match=r"pip install timm>=1.0.9 failed in .*\(ERROR: Cannot "
                                       r"install timm .*\); install them yourself"):
        env_check.pip_install(["timm>=1.0.9"], [])


def test_main_reports_and_exits_2_without_calling_pip(monkeypatch, capsys):
    monkeypatch.setattr(env_check, "installed_version",
                        fake({**{n: "99" for n in env_check.RUNTIME}, "torch": "2.1.2"}))
    monkeypatch.setattr(env_check.subprocess, "run", lambda *a, **k: pytest.fail("pip called"))
    assert env_check.main(["--python", "py"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: torch 2.1.2 is installed, older than")


# --------------------------------------------------------------------------- run.sh
def _copy_repo(dst: Path) -> Path:
    """run.sh + kit/ + requirements.txt: enough for run.sh, without the .venv."""
    dst.mkdir()
    for name in ("run.sh", "requirements.in", "requirements.txt", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "kit", dst / "kit", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _run(cmd, cwd, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KIT_PYTHON")}
    return subprocess.run(cmd, cwd=cwd, env={**clean, **env}, capture_output=True, text=True,
                          timeout=300)


def test_run_sh_uses_kit_python_and_makes_no_venv(tmp_path):
    repo = _copy_repo(tmp_path / "clone")
    proc = _run(["bash", "run.sh", "validate", "--data", str(tmp_path / "nowhere")], repo,
                KIT_PYTHON=sys.executable)
    assert not (repo / ".venv").exists()
    lines = proc.stderr.splitlines()
    assert lines[0] == (f"run.sh: KIT_PYTHON={sys.executable} (Python "
                        f"{'.'.join(map(str, sys.version_info[:3]))}, no .venv): torch "
                        f"{metadata.version('torch')}, torchvision "
                        f"{metadata.version('torchvision')}, "
                        f"timm {metadata.version('timm')}, transformers "
                        f"{metadata.version('transformers')}; {len(env_check.RUNTIME) - 4} "
                        "other packages ok; nothing to install")
    # ... and the command ran in that interpreter: the kit's own one-line error, exit 2.
    assert proc.returncode == 2 and "nowhere" in lines[1] and lines[1].startswith("error:")


def test_run_sh_refuses_a_bad_kit_python(tmp_path):
    repo = _copy_repo(tmp_path / "clone")
    proc = _run(["bash", "run.sh", "--version"], repo, KIT_PYTHON=str(tmp_path / "python9"))
    assert proc.returncode == 2 and not (repo / ".venv").exists()
    assert proc.stderr.strip().splitlines() == [
        f"error: KIT_PYTHON={tmp_path / 'python9'} is not a Python 3.10+ interpreter; point it "
        "at one (e.g. KIT_PYTHON=$(which python3)) or unset it to use .venv"]


def test_pip_install_of_the_project_adds_only_the_kit(tmp_path):
    """What ``pip install .`` would change here, where the pinned stack is installed: the kit
    itself and nothing else (torch and the rest already satisfy the lower bounds)."""
    import setuptools

    if parse_version(setuptools.__version__) < (64,):
        pytest.skip(f"setuptools {setuptools.__version__} < 64 cannot build from pyproject.toml "
                    "without build isolation (which needs the network)")
    repo = _copy_repo(tmp_path / "clone")
    report = tmp_path / "report.json"
    proc = _run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation",
                 "--disable-pip-version-check", "-q", "--report", str(report), ".[dev]"], repo)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    install = json.loads(report.read_text())["install"]
    assert [(i["metadata"]["name"], i["metadata"]["version"]) for i in install] == [
        ("an2dl-kit", __import__("kit").__version__)]
    meta = install[0]["metadata"]
    assert any(r.startswith("torch>=") for r in meta["requires_dist"])
