#!/usr/bin/env bash
# Inputs of bench/gpu_suite.sh for a device machine that reaches no network: the wheels its Python lacks
# (.whl/, for its Python version, default 3.12) and the 300 ImageNet sample images (.bench_images/).
# Both are git-ignored; carry them to the device: run(..., carry=[".whl", ".bench_images"]).
#   bash bench/prepare_gpu.sh [python-version]
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
  open_clip_torch==3.3.0 webdataset==1.0.2 "zarr==3.1.6" "numcodecs==0.16.5" donfig google-crc32c ftfy wcwidth \
  braceexpand "timm>=1.0" "typer==0.29.2" "safetensors" "tensorboard" "pyyaml"
SAMPLE=${CAE2_BENCH_IMAGES:-../shared/data/imagenet-sample}
rm -rf .bench_images && cp -r "$SAMPLE" .bench_images
echo "prepared: $(ls .whl | wc -l) wheels in .whl/, $(ls .bench_images | wc -l) images in .bench_images/"
