#!/usr/bin/env bash
# The GPU benchmark set, as one script (bf16, realistic batch). Writes the sections of docs/benchmarks.md
# and copies them to $OUT when that is set.
#   CAE2_BENCH_IMAGES=/path/to/imagenet-sample bash bench/gpu_suite.sh
# Needs the environment of scripts/setup.sh (or torch, open_clip, webdataset, zarr, accelerate installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -m bench.extract --images 300 --views 4 --batch-size 512 --workers 12
"$PY" -m bench.speedup --images 300 --steps 40 --batch-size 128 --mixed-precision bf16 --workers 12
"$PY" -m bench.data_pipeline --batches 8
if [ -n "${OUT:-}" ]; then cp docs/benchmarks.md "$OUT/"; fi
