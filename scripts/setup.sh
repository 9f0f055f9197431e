#!/usr/bin/env bash
# Create .venv (if needed) and install cae2 with its pinned torch and dev tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
pip_install torch==2.14.1 torchvision==0.29.1
pip_install -e ".[dev]"
.venv/bin/python -c "import torch, open_clip, webdataset, zarr, accelerate, typer, cae2; print('cae2 environment ready: torch', torch.__version__, '| zarr', zarr.__version__)"
