#!/usr/bin/env bash
# The engines of issue #24 side by side on this machine's CPU: the shipped 10 models x 8 flips, one
# 240 x 240 x 155 phantom case, eager float32 first as the reference (`brats-cls bench --engine`).
#
#   bench/cpu_engines.sh             # native ISA, then the same machine capped to AVX2
#   TAG=2models MODELS="--size demo --models 2" bench/cpu_engines.sh   # one network of each architecture (random
#                                    # demo weights cost what trained ones do); x5 for ten models
#
# Pause any other job first (kill -STOP). Writes into "${OUT:-bench/results}":
#   cpu_engines_<cpu>.{json,txt}        every engine at float32, and in bfloat16 where the CPU has it
#   cpu_engines_<cpu>_avx2.{json,txt}   oneDNN and ATen capped to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2,
#                                       ATEN_CPU_CAPABILITY=avx2): what PyTorch and OpenVINO's oneDNN
#                                       convolutions do on an AVX2-only CPU. An emulation, not such a
#                                       CPU: OpenVINO's own kernels and ONNX Runtime's MLAS still use
#                                       AVX-512, and caches and clocks are this machine's.
# shellcheck source=bench/setup.sh
source "$(dirname "$0")/setup.sh"
cpu=$(grep -m1 -q amx_tile /proc/cpuinfo && echo amx || { grep -m1 -q avx512_bf16 /proc/cpuinfo && echo avx512bf16; } || { grep -m1 -q avx512f /proc/cpuinfo && echo avx512; } || echo avx2)
native=${ENGINES:-eager-cl,compile,onnxruntime,openvino,eager:bf16,openvino:bf16}
capped=${ENGINES_AVX2:-eager-cl,onnxruntime,openvino}
status=0
run() {  # run NAME ENGINES [ENV...]
    local name=$1 engines=$2
    shift 2
    echo "== $name: $engines"
    # shellcheck disable=SC2086
    env "$@" "$PYTHON" -m brats_cls bench ${MODELS:---weights weights} --device cpu --engine "$engines" \
        --json "$OUT_DIR/$name.json" > "$OUT_DIR/$name.txt" 2> "$OUT_DIR/$name.log" || status=1
    cat "$OUT_DIR/$name.txt"
}
{ lscpu | grep -E "Model name|^CPU\(s\)"; grep -m2 -E "^(cpu family|model)\s" /proc/cpuinfo; uptime; git rev-parse --short HEAD; } > "$OUT_DIR/cpu_engines_$cpu.machine" 2>&1
run "cpu_engines_$cpu${TAG:+_$TAG}" "$native"
[ "$cpu" = avx2 ] || run "cpu_engines_${cpu}${TAG:+_$TAG}_avx2" "$capped" ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
exit $status
