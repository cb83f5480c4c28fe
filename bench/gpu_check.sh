#!/usr/bin/env bash
# GPU check of issue #12, about 5 minutes on one GPU (CUDA build of torch in $PYTHON's env):
#   1. teacher: SmolLM2-135M served over gRPC vs in-process forward + top-k, tokens/s, bf16
#      (the teacher's dtype "auto" is bfloat16 on CUDA), sequences of 512 and 2048 tokens;
#   2. trainer: SmolLM2-135M as the target, bf16 autocast with fp32 master weights, FSDP2 on one
#      GPU, 2 micro-batches of 4 x 1024 tokens per step: fused (lambda 0.9, two tiny teachers and
#      the aligner) vs CLM-only step time, and each run's peak GPU memory;
#   3. the loss's peak memory at V = 32k and 128k (synthetic logits, CPU RSS; fused in chunks vs
#      the plain cross-entropy of a CLM-only run).
# Writes gpu-check/*.txt (or $OUT/*.txt); the numbers go into docs/benchmarks.md (Trainer).
# Not run on the 2-core development machine (no GPU there).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

echo "== 1. teacher: served vs in-process, SmolLM2-135M, bf16"
timeout 150 "$PYTHON" bench/bench_teacher.py --models smollm2 --lengths 512,2048 --rounds 2 \
    | tee "$OUT/teacher.txt"

echo "== 2. trainer: fused vs CLM-only, SmolLM2-135M target, bf16 autocast, FSDP on 1 GPU"
timeout 150 "$PYTHON" bench/bench_trainer.py --target smollm2 --use-gpu --parallel fsdp \
    --mixed-precision bf16 --steps 8 --block-size 1024 --batch-size 4 --grad-accum 2 \
    --skip-memory | tee "$OUT/trainer.txt" || echo "(the step-time ratio missed its target)"

echo "== 3. loss peak memory, V = 32k and 128k"
timeout 60 "$PYTHON" bench/bench_trainer.py --skip-steps --memory-length 2048 \
    | tee "$OUT/loss-memory.txt"
