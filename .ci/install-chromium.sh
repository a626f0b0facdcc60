#!/usr/bin/env bash
# Install Debian's chromium for the report's headless-browser render test
# (tests/test_report.py::test_renders_in_headless_chromium, which must not skip in CI).
# Idempotent: does nothing when a chromium is already on the PATH.
set -euo pipefail

say() { echo "install-chromium: $*" >&2; }

for name in chromium chromium-browser; do
    if command -v "$name" >/dev/null 2>&1; then
        say "$name already installed ($(command -v "$name"))"
        exit 0
    fi
done

if [ "$(id -u)" = 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo -n)
else
    say "not root and no sudo: install chromium by hand (apt-get install -y chromium)"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
say "installed $(chromium --version 2>/dev/null || echo chromium)"
