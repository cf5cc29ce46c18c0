#!/usr/bin/env bash
# verl's real packages for tests/rl/test_verl_real.py, which runs this when they are missing (or run it by hand):
# each supported release (loraforge.rl.verl_launch.SUPPORTED_VERL) with --no-deps into .cache/verl/VERSION (its own
# requirements are GPU-scale), and the packages its shipped Hydra configuration and DAPO reward manager import into
# .cache/verl/deps. Beside .venv, never in it: hydra-core pins antlr4 4.9, while math-verify in .venv needs antlr4
# 4.13. Each directory is built under a temporary name and renamed when complete (an interrupted run is redone) and
# rebuilt when its pins change. The three installs run side by side (each is mostly download and unpacking).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
INSTALL="$PY -m pip --disable-pip-version-check -q install --no-compile --no-deps"
target() {
    local dir=$1
    shift
    [ "$(cat "$dir/.pins" 2>/dev/null)" = "$*" ] && return 0
    rm -rf "$dir.part"
    $INSTALL --target "$dir.part" "$@"
    echo "$*" >"$dir.part/.pins"
    rm -rf "$dir"
    mv "$dir.part" "$dir"
}
pids=()
for v in $("$PY" -c "from loraforge.rl.verl_launch import SUPPORTED_VERL; print(*SUPPORTED_VERL)"); do
    target ".cache/verl/$v" "verl==$v" &
    pids+=($!)
done
target .cache/verl/deps hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
    ray==2.60.0 msgpack==1.2.4 protobuf==7.36.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
    referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 tensordict==0.15.3 pyvers==0.2.3 cloudpickle==3.1.3 \
    aiohttp==3.14.5 multidict==7.2.1 yarl==1.25.1 propcache==0.5.4 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 \
    frozenlist==1.8.0 codetiming==1.4.0 orjson==3.13.0 &
pids+=($!)
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
