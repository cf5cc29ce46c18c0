#!/usr/bin/env bash
# Set up from nothing, lint, and run the whole test suite: bash scripts/test.sh
# Extra arguments go to pytest (e.g. -m "not slow" skips the real-model tests, -n 0 runs in one process).
# A lint or format finding fails the run before any test: fix it with `.venv/bin/ruff check --fix .`
# and `.venv/bin/ruff format .` (config in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
export HF_HUB_OFFLINE=1
# the install wrote no bytecode (setup.sh) and the suite starts a few hundred Python processes: the first to import
# a module compiles it once for all (with PYTHONDONTWRITEBYTECODE set, each would compile torch anew, ~3 s each)
unset PYTHONDONTWRITEBYTECODE
# One test process per core (pytest-xdist), one thread each: the tests' matrices are small, and threads of two
# processes on the same cores only wait for each other.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# SmolLM2 once for every test process, where the quickstart writes it (reused if it is there).
export LORAFORGE_SMOLLM2_DIR=${LORAFORGE_SMOLLM2_DIR:-$PWD/models/SmolLM2-135M-Instruct}
exec .venv/bin/python -m pytest -n auto --dist loadscope --no-loadscope-reorder "$@"
