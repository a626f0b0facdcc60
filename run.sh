#!/usr/bin/env bash
# One entry point: bootstraps .venv from requirements.txt (re-installs only when it changed),
# then runs `python -m kit <command>`; `./run.sh test` runs the test suite.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
export NO_ALBUMENTATIONS_UPDATE=1
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"  # see kit/__init__.py
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "run.sh: setting up $venv from requirements.txt (first run takes a few minutes)" >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$here/requirements.txt"
    echo "$want" > "$stamp"
fi
py="$venv/bin/python"
case "${1:-}" in
    test)
        shift
        cd "$here"
        exec "$py" -m pytest -q tests "$@"
        ;;
    kaggle)
        shift
        exec "$venv/bin/kaggle" "$@"
        ;;
    *)
        exec "$py" -m kit "$@"
        ;;
esac
