#!/usr/bin/env bash
# Run the default test suite from the repo root, setting up first if needed: every test but the
# `slow` ones (which load the bundled models), on two processes (pytest-xdist).
#   scripts/test.sh                 # the default suite (about 5 minutes on 2 cores)
#   scripts/test.sh -m slow         # the slow tests (SmolLM2, Gemma-3, the notebook)
#   scripts/test.sh -m "" -n 0      # everything, in one process
# Extra arguments go to pytest; a later -m or -n replaces the default one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -n "${CIRCUITS_TEST_WORKERS:-2}" -m "not slow" "$@"
