#!/usr/bin/env bash
# Set up gmner in a virtual environment (once; again when pyproject.toml or constraints.txt
# change) and run one of its jobs:
#   scripts/dev.sh demo    the main job
#   scripts/dev.sh test    the test suite (what CI runs)
#   scripts/dev.sh setup   only the set-up
# GMNER_VENV picks the environment folder (default .venv), PYTHON the interpreter (>= 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GMNER_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
    local stamp="$VENV/.gmner-installed" want
    want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
        echo "gmner needs Python >= 3.11; set PYTHON to one" >&2; exit 1; }
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # The CPU build of torch first, pinned; constraints.txt keeps every later step on it.
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[train,export,bench,dev]"
    echo "$want" > "$stamp"
}

demo() {
    # Grounded extraction with the embedded default model on the shipped examples:
    # a table and JSON on stdout, annotated images and results.json in out/demo.
    "$VENV/bin/gmner" demo --out "${OUT:-out}/demo"
}

case "${1:-}" in
    setup) setup ;;
    demo) setup; mkdir -p "${OUT:-out}"; demo ;;
    test) setup; shift; exec "$VENV/bin/python" -m pytest -q "$@" ;;
    *) echo "usage: scripts/dev.sh setup|demo|test [pytest args]" >&2; exit 2 ;;
esac
