#!/usr/bin/env bash
# The GPU measurements of issue 16 in one prepared run (about 8 minutes on one H100/H200).
# Each benchmark prints one JSON line into $OUT (default ./gpu_check), with the device's own
# matmul peak measured in the same run, so every figure is a ratio:
#   train_base_bf16.json   base config (Table 10), bf16-mixed: model loop and Lightning trainer,
#                          fraction of the bf16 matmul peak (target >= 0.40), peak GPU memory
#   train_tiny_fp32.json   tiny config, 32-true (launch-bound; for the table in docs/training.md)
#   embed_base_bf16.json   `spatia embed` end to end vs the model alone (the fixed cost), base config
#   embed_tiny.json        the same with tiny: a fixed cost shows as end-to-end << model-alone cells/s
#   pair_cuda.json         pairing 20,000 x 20,000 on the GPU (ours and geomloss, same tolerance)
#   flow_cuda.json         flow training steps/s and generated images/s (issue 13)
# Usage (repository root, after `make install`):  bash benchmarks/gpu_check.sh [OUT_DIR]
set -u
OUT=${1:-gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" 2>&1
run() {  # name, timeout seconds, command...
    local name=$1 limit=$2; shift 2
    local start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"
    echo "$name rc=$? seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/summary.txt"
}
run train_base_bf16 200 $PY benchmarks/bench_train.py --config base --device cuda --precision bf16-mixed --cells 20000 --num-workers 6
run train_tiny_fp32 60 $PY benchmarks/bench_train.py --config tiny --device cuda --precision 32-true
run embed_base_bf16 120 $PY benchmarks/bench_embed.py --config base --device cuda --precision bf16-mixed --profile
run embed_tiny 60 $PY benchmarks/bench_embed.py --config tiny --device cuda --profile
run pair_cuda 120 $PY benchmarks/bench_pair.py --device cuda --compare 0 --real '' --peer-iters 0 \
    --memory-mb 8000 --block-mb 256 --geomloss-max-mb 40000
run flow_cuda 60 $PY benchmarks/bench_flow.py --device cuda --batch 256 --seconds 10
