#!/usr/bin/env bash
# Set up from nothing and run the whole test suite: bash scripts/test.sh
# Extra arguments go to pytest (e.g. -m "not slow" skips the real-model tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
