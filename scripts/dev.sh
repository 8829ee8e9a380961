#!/usr/bin/env bash
# Set up gmner in a virtual environment (once; again when pyproject.toml or constraints.txt
# change) and run one of its jobs:
#   scripts/dev.sh demo    the main job
#   scripts/dev.sh test    the test suite (what CI runs): the whole suite on Python >= 3.11,
#                          then the runtime's tests on Python 3.10 with the oldest supported
#                          numpy (1.26) and onnxruntime (1.19), as on a JetPack 6 board
#   scripts/dev.sh setup   only the set-up
# GMNER_VENV picks the environment folder (default .venv), PYTHON the interpreter (>= 3.11);
# PYTHON310 the 3.10 interpreter (default: python3.10 on PATH, else pyenv's), GMNER_VENV310
# its environment (default .venv-py310); GMNER_REQUIRE_PY310=1 (CI) fails without one.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GMNER_VENV:-.venv}
PY=${PYTHON:-python3}
VENV310=${GMNER_VENV310:-.venv-py310}
# The oldest versions the runtime supports, tested on Python 3.10.
RUNTIME_FLOOR=("numpy==1.26.4" "onnxruntime==1.19.2")

stamp_of() { cat pyproject.toml bench/pyproject.toml constraints.txt scripts/dev.sh | sha256sum | cut -d' ' -f1; }

setup() {
    local stamp="$VENV/.gmner-installed" want
    want=$(stamp_of)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
        echo "gmner's full set-up needs Python >= 3.11 (torch); set PYTHON to one" >&2; exit 1; }
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # The CPU build of torch first, pinned; constraints.txt keeps every later step on it.
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[cpu,train,export,serve,ray,grpo,dev]"
    # The benchmarks against peers: a distribution of their own (bench/), not the runtime's.
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e ./bench
    echo "$want" > "$stamp"
}

python310() {
    if [ -n "${PYTHON310:-}" ]; then echo "$PYTHON310"; return; fi
    local candidate
    for candidate in python3.10 \
        $(command -v pyenv >/dev/null && ls -d "$(pyenv root)"/versions/3.10*/bin/python3.10 2>/dev/null); do
        # a pyenv shim answers to the name without a 3.10 behind it: run it to know
        if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' 2>/dev/null; then
            echo "$candidate"; return
        fi
    done
}

setup310() {
    local py="$1" stamp="$VENV310/.gmner-installed" want
    want=$(stamp_of)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    "$py" -m venv "$VENV310"
    "$VENV310/bin/python" -m pip install -q --upgrade pip
    # The runtime alone (no torch: its wheel here is for 3.11), at its oldest versions.
    "$VENV310/bin/python" -m pip install -q -e ".[cpu]" "${RUNTIME_FLOOR[@]}" \
        "pytest>=8" "hypothesis>=6.100"
    echo "$want" > "$stamp"
}

test310() {
    local py
    py=$(python310)
    if [ -z "$py" ]; then
        echo "scripts/dev.sh: no Python 3.10 found (set PYTHON310): runtime suite on 3.10 skipped" >&2
        # CI must run it: there a missing 3.10 is a failure, not a skip
        [ -z "${GMNER_REQUIRE_PY310:-}" ] || exit 1
        return
    fi
    setup310 "$py"
    echo "== the runtime's tests on Python 3.10, ${RUNTIME_FLOOR[*]}"
    "$VENV310/bin/python" -m pytest -q "$@"
}

demo() {
    # Grounded extraction with the embedded default model on the shipped examples:
    # a table and JSON on stdout, annotated images and results.json in out/demo.
    "$VENV/bin/gmner" demo --out "${OUT:-out}/demo"
}

case "${1:-}" in
    setup) setup ;;
    demo) setup; mkdir -p "${OUT:-out}"; demo ;;
    test)
        setup; shift
        "$VENV/bin/python" -m pytest -q "$@"
        test310 "$@"
        ;;
    *) echo "usage: scripts/dev.sh setup|demo|test [pytest args]" >&2; exit 2 ;;
esac
