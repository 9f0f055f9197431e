#!/usr/bin/env bash
# The GPU benchmark set in two calls of under 5 minutes each, so that one session measures everything
# with a rerun to spare (bf16, the batches users should run):
#   bash bench/gpu_suite.sh call1     # views + decode + extract   (limits 60 + 60 + 170 s)
#   bash bench/gpu_suite.sh call2     # pipeline + speedup (limits 50 + 210 s)
#   bash bench/gpu_suite.sh students  # each student's step by batch and compile mode (limit 240 s), when a
#                                     # session has a third call to spare
#   bash bench/gpu_suite.sh [section ...]   # any of: views decode extract pipeline speedup students
# Adds `-gpu` sections to docs/benchmarks.md (the CPU sections stay) and copies the doc and the log to
# $OUT when that is set. Prepare the device's inputs first, on this machine: `bash bench/prepare_gpu.sh`
# (wheels the device lacks in .whl/, the 300 sample images in .bench_images/); the script installs the
# wheels when they are there. Loader workers default to the cores less two.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
W=${CAE2_BENCH_WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
LOG=${OUT:-/tmp}/gpu_suite.log
case "${1:-}" in
  call1) SECTIONS="views decode extract" ;;
  call2) SECTIONS="pipeline speedup" ;;
  *) SECTIONS=${*:-views decode extract pipeline speedup} ;;
esac
if [ -d .whl ]; then  # prepared by bench/prepare_gpu.sh: what the device's Python lacks
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/cae2-site .whl/*.whl && export PYTHONPATH=/tmp/cae2-site:$PWD
fi
if [ -d .bench_images ]; then export CAE2_BENCH_IMAGES=${CAE2_BENCH_IMAGES:-$PWD/.bench_images}; fi
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
    decode) bench 60 bench.device_views --images 300 --views 5 --batch-size 512 --decoder device ;;
    extract) bench 170 bench.extract --images 300 --repeat 24 --views 5 --batch-size 512 --workers "$W" \
        --view-path device --decoder device --teacher-modes fp16,fp16-weights,fp16-weights+compile ;;
    pipeline) bench 50 bench.data_pipeline --repeat 6 --batches 56 --workers "0,$W" ;;
    speedup) bench 210 bench.speedup --images 300 --repeat 24 --steps 30 --batch-size 256 --mixed-precision bf16 \
        --compile --view-path device --workers "$W" --students cae2_vit_tiny,cae2_vit_small,cae2_vit_base \
        --step-table 128:0,256:0,256:1 ;;
    students) bench 240 bench.speedup --steps-only --steps 20 --mixed-precision bf16 \
        --students cae2_vit_tiny,cae2_vit_small,cae2_vit_base \
        --step-table 256:default,256:reduce-overhead,512:reduce-overhead,1024:reduce-overhead,512:max-autotune-no-cudagraphs ;;
    *) echo "unknown section $s" | tee -a "$LOG"; status=1 ;;
  esac
done
exit $status
