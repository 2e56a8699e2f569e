#!/bin/bash
# The GPU benchmarks (generation, fine-tuning, DDPO's gradient check) in one call, e.g. on a machine lent for an hour
# (results: benchmarks/RESULTS.md). Wheels in .whl/ (packages the machine lacks, e.g. diffusers,
# duckdb, open_clip_torch) are installed to /tmp/site first; logs go to $OUT (or ./gpu-logs).
set -o pipefail
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout "${GENERATION_SECONDS:-300}" python3 benchmarks/generation_bench.py --gpu 2>&1 | tee "$OUT/generation.log"
timeout "${FINETUNE_SECONDS:-220}" python3 benchmarks/finetune_bench.py --device cuda --steps 2 2>&1 \
  | grep --line-buffered -v "fine-tuning (" | tee "$OUT/finetune.log"
timeout "${DDPO_CHECK_SECONDS:-150}" python3 benchmarks/ddpo_gradient_check.py --device cuda --samples 512 4096 16384 \
  --exact-samples 4096 --batch-size 1024 2>&1 | tee "$OUT/ddpo_gradient_check.log"
