#!/usr/bin/env bash
# Benchmarks on one CUDA device, for a GPU machine lent for a few minutes (under 5 minutes in all).
#
#   bench/gpu.sh [WHEEL_DIR]
#
# Needs `brats_cls` importable: this checkout's src/ is put on PYTHONPATH; WHEEL_DIR (optional) holds
# wheels installed offline (--no-index) first, e.g. the project's own wheel. Nothing else is installed.
# Writes JSON and text results into "${OUT:-bench/results}":
#   gpu_paper.json  paper-size ensemble, 10 models x 8 flips, one 240x240x155 phantom case:
#                   bf16 + cudnn.benchmark (reference; its peak GPU memory is the 12 GiB target),
#                   flips batched by 2, channels_last_3d; naive path on 2 models (one per arch,
#                   extrapolated to 10); training throughput at the paper's crops
#   gpu_demo.json   demo-size ensemble: bf16, flips batched by 8, fp32; naive path on all 10 models
# shellcheck source=bench/setup.sh
source "$(dirname "$0")/setup.sh"

if [ "${1:-}" != "" ]; then
    shopt -s nullglob
    wheels=("$1"/*.whl)
    if [ ${#wheels[@]} -gt 0 ]; then
        "$PYTHON" -m pip install --quiet --no-index --find-links "$1" "${wheels[@]}" || exit 1
    fi
fi
"$PYTHON" -c "import brats_cls, torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
uptime > "$OUT_DIR/uptime.txt" 2>&1 || true

status=0
run() {  # run NAME SECONDS ARGS...: one bench, its table and log in OUT_DIR, a timeout of its own
    local name=$1 seconds=$2
    shift 2
    echo "== $name (at most ${seconds}s)"
    timeout "$seconds" "$PYTHON" -m brats_cls bench --device cuda "$@" --json "$OUT_DIR/$name.json" \
        > "$OUT_DIR/$name.txt" 2> "$OUT_DIR/$name.log"
    local rc=$?
    cat "$OUT_DIR/$name.txt"
    [ $rc -eq 0 ] || { echo "$name failed (exit $rc), see $OUT_DIR/$name.log"; tail -5 "$OUT_DIR/$name.log"; status=1; }
}

run gpu_paper 200 --size paper --models 10 \
    --variant precision=bf16,cudnn_benchmark=1 \
    --variant precision=bf16,cudnn_benchmark=1,flip_batch=2 \
    --variant precision=bf16,cudnn_benchmark=1,channels_last=1 \
    --naive-models 2 --training --training-steps 3
run gpu_demo 80 --size demo --models 10 \
    --variant precision=bf16,cudnn_benchmark=1 \
    --variant precision=bf16,cudnn_benchmark=1,flip_batch=8 \
    --variant precision=fp32,cudnn_benchmark=1
uptime >> "$OUT_DIR/uptime.txt" 2>&1 || true
exit $status
