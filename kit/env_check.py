"""Run the kit in an existing Python environment (``KIT_PYTHON=/path/to/python ./run.sh ...``).

Kaggle and Colab notebooks (and conda environments) already hold a CUDA build of torch; the
kit uses it instead of building ``.venv``. ``python -m kit.env_check`` compares the installed
versions with :data:`RUNTIME` (the floors of ``pyproject.toml``'s dependencies, kept equal by
``tests/test_packaging.py``), installs what is missing or too old with pip, and prints one
line saying what it found and did. It never replaces an installed torch: pip runs with a
constraint holding torch (and torchvision) at their installed versions.

Only the standard library is used here: this runs before anything is known to be installed.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata

# Distribution name -> lowest supported version. Floors are where the kit's API use starts
# (torch.OutOfMemoryError and torch.amp.GradScaler(device): torch 2.5; timm's
# load_state_dict(weights_only=): 1.0.9; Optuna's RetryHeartbeatStaleTrialCallback: 4.9;
# transformers 4.45 cannot load a .safetensors file without metadata, 4.51 can); the tested
# versions are the exact pins of requirements.in (locked, with everything they pull in, in
# requirements.txt).
RUNTIME = {
    "torch": "2.5",
    "torchvision": "0.20",
    "timm": "1.0.9",
    "transformers": "4.51",
    "huggingface-hub": "0.30",
    "safetensors": "0.4.3",
    "albumentations": "2.0",
    "torchstain": "1.4",
    "numpy": "1.26",
    "pandas": "2.2",
    "scikit-learn": "1.5",
    "scipy": "1.11",
    "optuna": "4.9",
    "cleanlab": "2.6",
    "kaggle": "1.7",
    "six": "1.16",
    "pillow": "10.0",
    "tqdm": "4.66",
    "matplotlib": "3.8",
    "pyyaml": "6.0",
    "imagehash": "4.3",
    "jinja2": "3.1",
    "filelock": "3.12",
    "pydantic": "2.6",
}
# What `./run.sh test` needs on top (pyproject's `dev` extra).
DEV = {
    "pytest": "8.0",
    "pytest-xdist": "3.5",
    "import-linter": "2.0",
    "psycopg2-binary": "2.9",
    "nbclient": "0.10",
    "nbformat": "5.10",
    "ipykernel": "6.29",
    "ruff": "0.17",
}
# Named in the one-line summary; the rest are counted.
HEADLINE = ("torch", "torchvision", "timm", "transformers")
# Never replaced when installed (a notebook's CUDA build); torchvision is bound to its torch.
HELD = ("torch", "torchvision")


def parse_version(text: str) -> tuple[int, ...]:
    """The release numbers of a version string: ``"2.6.0+cu124"`` -> ``(2, 6, 0)``.

    Local tags (``+cu124``) and pre-release suffixes are ignored: a ``2.6.0rc1`` counts as
    2.6.0, close enough for a floor check.
    """
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(text))
    if not match:
        raise ValueError(f"not a version: {text!r}")
    parts = [int(p) for p in match.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()  # 2.5.0 == 2.5
    return tuple(parts)


def at_least(installed: str, floor: str) -> bool:
    return parse_version(installed) >= parse_version(floor)


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check(requirements: dict[str, str], versions=None) -> dict[str, list]:
    """Sort ``requirements`` into ``ok``, ``missing`` and ``old`` (lists of tuples).

    ``ok``: ``(name, version)``; ``missing``: ``(name, floor)``; ``old``:
    ``(name, version, floor)``. ``versions(name)``: the installed version or None
    (default: :func:`installed_version`).
    """
    versions = versions or installed_version
    out = {"ok": [], "missing": [], "old": []}
    for name, floor in requirements.items():
        version = versions(name)
        if version is None:
            out["missing"].append((name, floor))
        elif at_least(version, floor):
            out["ok"].append((name, version))
        else:
            out["old"].append((name, version, floor))
    return out


class EnvError(Exception):
    """A problem the user fixes; printed as one line, exit code 2 (as the kit's KitError)."""


def plan(found: dict[str, list]) -> list[str]:
    """pip requirement strings for what is missing or too old.

    Raises
    ------
    EnvError
        When an installed torch or torchvision is too old: the kit does not replace them.
    """
    held = [(n, v, f) for n, v, f in found["old"] if n in HELD]
    if held:
        name, version, floor = held[0]
        raise EnvError(
            f"{name} {version} is installed, older than the kit supports ({name}>={floor}); "
            f"the kit never replaces an installed {name}: upgrade it yourself (the build for "
            "your CUDA version, https://pytorch.org/get-started/locally/) or unset KIT_PYTHON "
            "to use .venv")
    return [f"{name}>={floor}" for name, floor in found["missing"]] + [
        f"{name}>={floor}" for name, _, floor in found["old"]]


def constraints(versions=None) -> list[str]:
    """``name==version`` for each installed held package: pip may not move them."""
    versions = versions or installed_version
    out = []
    for name in HELD:
        version = versions(name)
        if version is not None:
            out.append(f"{name}=={version}")
    return out


def summary(python: str, found: dict[str, list], did: str) -> str:
    """The one line ``run.sh`` prints."""
    have = {n: v for n, v in found["ok"]}
    have.update({n: f"{v} (too old)" for n, v, _ in found["old"]})
    have.update({n: "missing" for n, _ in found["missing"]})
    heads = ", ".join(f"{n} {have[n]}" for n in HEADLINE if n in have)
    rest = [n for n, _ in found["ok"] if n not in HEADLINE]
    py = ".".join(map(str, sys.version_info[:3]))
    return (f"run.sh: KIT_PYTHON={python} (Python {py}, no .venv): {heads}; "
            f"{len(rest)} other packages ok; {did}")


def pip_install(specs: list[str], held: list[str], dry_run: bool = False) -> None:
    """``python -m pip install`` the specs with torch held at its installed version."""
    with tempfile.TemporaryDirectory(prefix="kit-env-") as tmp:
        cons = os.path.join(tmp, "constraints.txt")
        with open(cons, "w") as f:
            f.write("".join(line + "\n" for line in held))
        cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q",
               "-c", cons, *specs]
        if dry_run:
            cmd.insert(cmd.index("install") + 1, "--dry-run")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        reason = next((ln.strip() for ln in lines if ln.lstrip().startswith("ERROR")),
                      lines[-1].strip() if lines else f"exit code {proc.returncode}")
        if "No module named pip" in proc.stdout:
            reason = "this Python has no pip"
        raise EnvError(f"pip install {' '.join(specs)} failed in {sys.executable} ({reason}); "
                       "install them yourself, or unset KIT_PYTHON to use .venv")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kit.env_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dev", action="store_true",
                        help="also the test requirements (./run.sh test)")
    parser.add_argument("--dry-run", action="store_true",
                        help="report what would be installed; install nothing")
    parser.add_argument("--python", default=os.environ.get("KIT_PYTHON", sys.executable),
                        help="name shown in the summary (default: $KIT_PYTHON)")
    args = parser.parse_args(argv)
    requirements = dict(RUNTIME, **(DEV if args.dev else {}))
    found = check(requirements)
    try:
        specs = plan(found)
        if not specs:
            did = "nothing to install"
        else:
            pip_install(specs, constraints(), dry_run=args.dry_run)
            verb = "would install" if args.dry_run else "installed"
            did = f"{verb} {', '.join(specs)} (torch held at its installed version)"
            if not args.dry_run:
                import importlib

                importlib.invalidate_caches()  # new dist-info folders since the first look
                still = plan(check(requirements))
                if still:
                    raise EnvError(f"after pip install, still missing or too old: "
                                   f"{', '.join(still)}")
    except EnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(args.python, found, did), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
