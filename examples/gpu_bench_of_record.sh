#!/usr/bin/env bash
# Benchmark of record (../shared/GPU.md): Llama-3-8B shape, seeded random bf16 weights, one GPU.
# before: transformers eager generate() in bf16; after: the model quantized to int8 / int4 (QuantLinear
# modules) on llmopt's engine (slow while the kernels are torch's aten ops: see BENCHMARKS.md). Same process.
# Run from the repo root: bash examples/gpu_bench_of_record.sh  (results under $OUT, default ./bench-out)
set -euo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export LLMOPT_CACHE_DIR="${LLMOPT_CACHE_DIR:-$PWD/.cache/llmopt}"
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
BATCHES="${BATCHES:-1,8,32}"
GEN="${GEN:-64}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for scheme in int8 int4; do  # each comparison is bounded so one slow path cannot starve the other
  timeout "${STEP_TIMEOUT:-280}" python -m llmopt bench --compare --before llama-3-8b --scheme "$scheme" --batch-sizes "$BATCHES" \
    --prompt-len 128 --gen-len "$GEN" --runs 3 --save "$OUT/llama-3-8b-$scheme.json" \
      --plot "$OUT/llama-3-8b-$scheme.png" --markdown | tee "$OUT/llama-3-8b-$scheme.md" || echo "$scheme: exit $?"
done
