#!/usr/bin/env bash
# The GPU benchmark set, as one script that fits a 10-minute call (bf16, the batches users should run).
# Adds `-gpu` sections to docs/benchmarks.md (the CPU sections stay) and copies the doc and the log to
# $OUT when that is set.
#   CAE2_BENCH_IMAGES=/path/to/imagenet-sample bash bench/gpu_suite.sh [section ...]
# Sections, in order: views extract pipeline speedup (default: all). Needs the environment of
# scripts/setup.sh (or torch, open_clip, webdataset, zarr, accelerate installed). Loader workers default
# to the cores less two (the main process and its CUDA threads).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
W=${CAE2_BENCH_WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
LOG=${OUT:-/tmp}/gpu_suite.log
SECTIONS=${*:-views extract pipeline speedup}
: > "$LOG"
status=0

bench() {  # one benchmark under a time limit; a failure is reported and the others still run
    local limit=$1; shift
    echo "== $* (limit ${limit}s)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$PY" -m "$@" 2>&1 | grep -v "Warning\|warn(" | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "== rc $rc after $(( SECONDS - t0 ))s" | tee -a "$LOG"
    [ "$rc" = 0 ] || status=1
    if [ -n "${OUT:-}" ]; then cp docs/benchmarks.md "$OUT/"; fi
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  "$PY" -c "import torch, open_clip, zarr, webdataset, PIL; print('torch', torch.__version__, 'open_clip',
  open_clip.__version__, 'zarr', zarr.__version__, 'Pillow', PIL.__version__)"; } 2>&1 | tee -a "$LOG"

for s in $SECTIONS; do
  case $s in
    views) bench 60 bench.device_views --images 300 --views 2 --batch-size 512 ;;
    extract) bench 170 bench.extract --images 300 --repeat 24 --views 5 --batch-size 512 --workers "$W" \
        --view-path device --teacher-modes fp16,fp16-weights,fp16-weights+compile ;;
    pipeline) bench 50 bench.data_pipeline --repeat 6 --batches 56 --workers "0,$W" ;;
    speedup) bench 265 bench.speedup --images 300 --repeat 40 --steps 40 --batch-size 256 --mixed-precision bf16 \
        --compile --view-path device --workers "$W" --students cae2_vit_tiny,cae2_vit_small,cae2_vit_base \
        --step-table 128:0,256:0,256:1 ;;
    *) echo "unknown section $s" | tee -a "$LOG"; status=1 ;;
  esac
done
exit $status
