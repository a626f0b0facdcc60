#!/usr/bin/env bash
# One entry point: bootstraps .venv from requirements.txt (re-installs only when it changed),
# then runs `python -m kit <command>`; `./run.sh test` runs the test suite.
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
        "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$here/requirements.txt"
        echo "$want" > "$stamp"
    fi
    py="$venv/bin/python"
    kaggle=("$venv/bin/kaggle")
fi
case "${1:-}" in
    test)
        shift
        cd "$here"
        exec "$py" -m pytest -q tests "$@"
        ;;
    kaggle)
        shift
        exec "${kaggle[@]}" "$@"
        ;;
    *)
        exec "$py" -m kit "$@"
        ;;
esac
