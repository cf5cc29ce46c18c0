#!/usr/bin/env bash
# Set up from nothing, lint, and run the whole test suite: bash scripts/test.sh
# Extra arguments go to pytest (e.g. -m "not slow" skips the real-model tests).
# A lint or format finding fails the run before any test: fix it with `.venv/bin/ruff check --fix .`
# and `.venv/bin/ruff format .` (config in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
