"""The ``an2dl-kit`` console script (``pip install .``): the same commands as ``./run.sh``.

Every kit command goes to :func:`kit.cli.main`; ``test`` and ``kaggle``, which ``run.sh``
handles itself, are handled here the same way: ``an2dl-kit test`` runs the suite of a source
checkout, ``an2dl-kit kaggle ...`` the kaggle package's CLI in this environment.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from kit.utils import KitError


def _tests_dir() -> Path:
    """``tests/`` beside the package (an editable install or a clone), or a KitError."""
    tests = Path(__file__).resolve().parent.parent / "tests"
    if not (tests / "conftest.py").is_file():
        raise KitError("an2dl-kit test: the tests are not installed with the package; run them "
                       "from a clone (./run.sh test, or pip install -e '.[dev]' there)")
    return tests


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        if command == "test":
            tests = _tests_dir()
            try:
                import pytest
            except ImportError:
                raise KitError("an2dl-kit test: pytest is not installed; "
                               "pip install -e '.[dev]'") from None
            os.chdir(tests.parent)  # the tests use paths relative to the repository
            return int(pytest.main(["-q", "tests", *argv[1:]]))
        if command == "kaggle":
            try:
                from kaggle.cli import main as kaggle_main
            except ImportError:
                raise KitError("an2dl-kit kaggle: the kaggle package is not installed; "
                               "pip install kaggle") from None
            sys.argv = ["kaggle", *argv[1:]]
            return int(kaggle_main() or 0)
    except KitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from kit.cli import main as kit_main

    os.environ.setdefault("KIT_PROG", "an2dl-kit")  # --help names the command typed
    return kit_main(argv)


if __name__ == "__main__":
    sys.exit(main())
