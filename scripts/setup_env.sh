#!/usr/bin/env bash
# setup_env.sh -- create or reuse the project's Python virtual environment and print its path.
#
# The environment lives OUTSIDE the clone (default ~/.cache/flash-dmattn/venv, override with FDMA_VENV) so that
# CI and repeated runs reuse the multi-GB torch install; a fresh machine gets everything from PyPI. The pins
# are in requirements-dev.txt; pip is a no-op when they are already satisfied.
#
#   VENV=$(scripts/setup_env.sh)   # then "$VENV/bin/python" ...
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FDMA_VENV:-$HOME/.cache/flash-dmattn/venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_env: creating $VENV" >&2
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-dev.txt >&2
echo "$VENV"
