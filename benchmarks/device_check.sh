#!/usr/bin/env bash
# The device check for a lent GPU (one H100/H200; several are used and reported per device): what issue 23 asks a
# GPU to show, in one run of under 8 minutes, its figures written as a section for benchmarks/RESULTS.md.
#
#   bash benchmarks/device_check.sh            # on the GPU machine; results in $OUT (or ./device-check-out)
#   bash benchmarks/device_check.sh --cpu      # tiny shapes on a CPU with the GPU path's code forced: checks the script
#                                              (rlpo and pissa; determinism: pissa)
#   bash benchmarks/device_check.sh --help     # this text
# $OUT must not hold a previous check's files (they are never written over): use a new directory each time.
#
# From a session with the device tool: run(command="bash benchmarks/device_check.sh", timeout_s=540); the files come
# back from $OUT: device_check.md (paste into RESULTS.md), gpu_init.json, gpu_determinism.json, train_smoke.json,
# train_vllm.json, device_check.log.
#
# Steps, each under its own time limit (a step that fails or runs out is recorded, and the next one runs):
#  1. the machine: GPU, driver, versions, the disk the checkpoint goes to                               (~5 s)
#  2. init (benchmarks/gpu_init.py): a Qwen2.5-7B-shaped checkpoint with a pretrained-like spectrum; rlpo, rlmo
#     and pissa, each cold and warm; PEFT pissa and loraforge pissa like with like on 4 blocks          (<= 270 s)
#  3. determinism (benchmarks/gpu_determinism.py, 2 blocks): the same command twice and under batch-mib 1 and
#     8192, byte for byte; `verify --device cpu` of the pissa adapter                                    (<= 85 s)
#  4. train (benchmarks/gpu_train_smoke.py): 2 steps of `loraforge train` on the device in bf16         (<= 40 s)
#  5. --rollout vllm: the same 2 steps with vLLM, if vLLM imports (it is not in the device image)        (<= 40 s)
#  6. device_check.md from the JSON files (benchmarks/device_report.py)
set -u
case "$#:${1:-}" in
    0:) MODE=gpu ;;
    1:--cpu) MODE=cpu ;;
    1:-h | 1:--help)
        sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "device_check.sh: error: unknown arguments: $*; expected none (the GPU check) or --cpu (see --help)" >&2
        exit 2
        ;;
esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/device-check-out}
for f in device_check.md device_check.log gpu_init.json gpu_determinism.json train_smoke.json train_vllm.json; do
    if [ -e "$OUT/$f" ]; then  # a previous check's results: never written over or appended to
        echo "device_check.sh: error: $OUT/$f already exists (a previous check's results); nothing was run:" \
            "set OUT to a new directory, or move that one away" >&2
        exit 2
    fi
done
mkdir -p "$OUT" || exit 2
BENCH_DIR=${DEVICE_CHECK_DIR:-${TMPDIR:-/tmp}/loraforge-bench}
LOG="$OUT/device_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
START=$(date +%s)

step() {  # step NAME LIMIT_S COMMAND...: run under `timeout`, log its output and how it ended
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s, $(($(date +%s) - START)) s in)" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: rc $rc$([ $rc = 124 ] && echo ' (timed out)'), $(($(date +%s) - START)) s in" | tee -a "$LOG"
}

if [ $MODE = gpu ]; then  # limits (s): init, determinism, train, train-vllm; about 7.4 minutes at most
    INIT_ARGS=(--device cuda)
    DET_ARGS=(--device cuda)
    TRAIN_ARGS=(--device cuda --dtype bfloat16)
    CKPT="$BENCH_DIR/qwen2.5-7b-powerlaw"
    PEFT_LAYERS=4
    LIMITS=(270 85 40 40)
else  # the GPU path's code (torch backend) on the CPU, tiny shapes
    # rlpo and pissa only: each method is one more process (imports are most of a CPU run) and runs the same code;
    # B0 = 0 before the like-with-like step and a residual base after it are what the order needs. The three methods'
    # bytes under other batch plans on the GPU path's code are tests/test_gpu_path.py's.
    INIT_ARGS=(--tiny --device cpu --force-gpu-backend --methods rlpo,pissa)
    DET_ARGS=(--device cpu --force-gpu-backend --methods pissa)
    TRAIN_ARGS=(--device cpu --dtype bfloat16)
    CKPT="$BENCH_DIR/tiny-powerlaw"
    PEFT_LAYERS=2
    LIMITS=(900 600 600 120)
fi
# DEVICE_CHECK_LIMITS="init determinism train train-vllm" (seconds) overrides them: a CPU shared with other jobs
# can be many times slower than a quiet one (the limits only guard against hangs there).
[ -n "${DEVICE_CHECK_LIMITS:-}" ] && read -r -a LIMITS <<<"$DEVICE_CHECK_LIMITS"
INIT_ARGS+=(--budget-s $((LIMITS[0] - 30)))  # gpu_init.py's own budget, inside the step's limit

{
    echo "device_check.sh ($MODE) at $(date -u +%FT%TZ), loraforge commit $(git rev-parse HEAD 2>/dev/null || echo 'unknown (no .git here)')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "no nvidia-smi"
    if [ $MODE = gpu ]; then
        "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), '| transformers', transformers.__version__, '| peft', peft.__version__)" 2>&1
    else  # the installed versions, not imported: on a CPU an import of all three is seconds, and no GPU is looked for
        "$PY" -c "from importlib.metadata import version as v; print('torch', v('torch'), '| transformers', v('transformers'), '| peft', v('peft'), '(installed; CPU mode)')" 2>&1
    fi
    mkdir -p "$BENCH_DIR" && df -hT "$BENCH_DIR" 2>&1 | tail -1
} | tee -a "$LOG"

step init "${LIMITS[0]}" "$PY" benchmarks/gpu_init.py "${INIT_ARGS[@]}" --dir "$CKPT" --peft-layers $PEFT_LAYERS \
    --json "$OUT/gpu_init.json"
step determinism "${LIMITS[1]}" bash -c "\"$PY\" -c 'import sys; sys.path.insert(0, \"benchmarks\"); import checkpoints; \
checkpoints.truncate_checkpoint(\"$CKPT\", \"$CKPT-2L\", 2)' && \"$PY\" benchmarks/gpu_determinism.py \
--model \"$CKPT-2L\" ${DET_ARGS[*]} --json \"$OUT/gpu_determinism.json\""
step train "${LIMITS[2]}" "$PY" benchmarks/gpu_train_smoke.py "${TRAIN_ARGS[@]}" --timeout-s $((LIMITS[2] - 5)) \
    --json "$OUT/train_smoke.json"
step train-vllm "${LIMITS[3]}" "$PY" benchmarks/gpu_train_smoke.py "${TRAIN_ARGS[@]}" --rollout vllm \
    --timeout-s $((LIMITS[3] - 5)) --json "$OUT/train_vllm.json"
"$PY" benchmarks/device_report.py "$OUT" >"$OUT/device_check.md" 2>>"$LOG"
echo "=== done in $(($(date +%s) - START)) s; $OUT/device_check.md:" | tee -a "$LOG"
cat "$OUT/device_check.md"
