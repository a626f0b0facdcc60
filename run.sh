#!/usr/bin/env bash
# One entry point: bootstraps .venv from requirements.txt, the full transitive lock with hashes
# (generated from requirements.in; re-installs only when the lock changed), then runs
# `python -m kit <command>`. `./run.sh test` runs the fast test tier (not slow, postgres,
# browser or gpu), `./run.sh test --all` every test; further arguments go to pytest.
# KIT_PYTHON=/path/to/python: use that interpreter's environment instead (a Kaggle, Colab or
# conda Python with its own torch); no .venv is made, only missing or too old packages are
# installed, never a different torch (kit/env_check.py).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export NO_ALBUMENTATIONS_UPDATE=1
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"  # see kit/__init__.py
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${KIT_PYTHON:-}" ]; then
    py="$KIT_PYTHON"
    if ! command -v "$py" >/dev/null 2>&1 || ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "error: KIT_PYTHON=$py is not a Python 3.10+ interpreter; point it at one (e.g. KIT_PYTHON=\$(which python3)) or unset it to use .venv" >&2
        exit 2
    fi
    dev=()
    [ "${1:-}" = test ] && dev=(--dev)
    "$py" -m kit.env_check --python "$py" ${dev[@]+"${dev[@]}"} || exit $?
    kaggle=("$py" -m kaggle)
else
    venv="$here/.venv"
    stamp="$venv/.requirements.sha256"
    want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "run.sh: setting up $venv from requirements.txt (first run takes a few minutes)" >&2
        [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --disable-pip-version-check -q --require-hashes \
            -r "$here/requirements.txt"
        echo "$want" > "$stamp"
    fi
    py="$venv/bin/python"
    kaggle=("$venv/bin/kaggle")
fi
case "${1:-}" in
    test)
        # The fast tier by default; --all: every tier (tests/conftest.py). pytest's exit
        # status is returned as is: 5 (no tests collected) is a failure.
        shift
        cd "$here"
        # --all runs in two pytest-xdist workers, one test file at a time each, unless the
        # arguments choose (-n, --dist, -p no:xdist): on the 2-core machine the whole suite
        # took 7.5 instead of 11.5 minutes, while the fast tier gained nothing (README).
        all=0 own=0
        for a in "$@"; do
            case "$a" in
                --all) all=1 ;;
                -n|-n*|--numprocesses*|--dist*|no:xdist|-pno:xdist) own=1 ;;
            esac
        done
        xdist=()
        if [ "$all$own" = 10 ] && "$py" -c 'import os, sys, xdist; sys.exit((os.cpu_count() or 1) < 2)' 2>/dev/null; then
            xdist=(-n 2 --dist loadfile)
        fi
        exec "$py" -m pytest -q ${xdist[@]+"${xdist[@]}"} "$@"
        ;;
    kaggle)
        shift
        exec "${kaggle[@]}" "$@"
        ;;
    *)
        exec "$py" -m kit "$@"
        ;;
esac
