#!/bin/bash
# The GPU benchmarks in one call (results: benchmarks/RESULTS.md):
#   bash benchmarks/gpu.sh                 # generation, fine-tuning, then DDPO on tiny-sd
#   bash benchmarks/gpu.sh ddpo            # only DDPO: its gradient check, its gain by setting, the GPU test
# Wheels in .whl/ (packages the machine lacks, e.g. diffusers, duckdb, open_clip_torch) are
# installed to /tmp/site first; logs go to $OUT (or ./gpu-logs).
set -o pipefail
parts=${*:-generation finetune ddpo}
for part in $parts; do
  case $part in generation|finetune|ddpo) ;; *) echo "unknown part $part (use generation, finetune, ddpo)" >&2; exit 2 ;; esac
done
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
for part in $parts; do
  case $part in
    generation)
      timeout "${GENERATION_SECONDS:-300}" python3 benchmarks/generation_bench.py --gpu 2>&1 | tee "$OUT/generation.log" ;;
    finetune)
      timeout "${FINETUNE_SECONDS:-220}" python3 benchmarks/finetune_bench.py --device cuda --steps 2 2>&1 \
        | grep --line-buffered -v "fine-tuning (" | tee "$OUT/finetune.log" ;;
    ddpo)
      timeout "${DDPO_CHECK_SECONDS:-100}" python3 benchmarks/ddpo_gradient_check.py --device cuda \
        --samples 1024 4096 16384 32768 --exact-samples 4096 --batch-size 4096 2>&1 | tee "$OUT/ddpo_gradient_check.log"
      # the test's settings (tests/test_finetune.py), run by pytest without the conftest's MLflow fixtures
      timeout "${DDPO_TEST_SECONDS:-220}" python3 -m pytest --noconftest -p no:cacheprovider -q \
        tests/test_finetune.py -k on_a_gpu 2>&1 | grep --line-buffered -v "fine-tuning (" | tee "$OUT/ddpo_test.log"
      timeout "${DDPO_GAIN_SECONDS:-200}" python3 benchmarks/ddpo_tiny_sd_gain.py --device cuda --steps 30 \
        --samples 1024 4096 16384 --learning-rates 3e-2 --seeds 0 2>&1 \
        | grep --line-buffered -v "fine-tuning (" | tee "$OUT/ddpo_gain.log" ;;
  esac
done
