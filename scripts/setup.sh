#!/usr/bin/env bash
# Create .venv (if needed) and install cae2 with its pinned torch and dev tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# libfiu (Debian's fiu-utils) injects EIO into running processes for the fault tests (tests/test_eio.py);
# they are skipped, saying why, where it cannot be installed.
if ! command -v fiu-ctrl >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q fiu-utils >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
    apt-get install -y -q fiu-utils >/dev/null 2>&1; } || echo "note: fiu-utils not installed: EIO tests will be skipped"
fi
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
pip_install -r scripts/torch.txt
pip_install -e ".[dev]"
.venv/bin/python -c "import torch, open_clip, webdataset, zarr, accelerate, typer, cae2; print('cae2 environment ready: torch', torch.__version__, '| zarr', zarr.__version__)"
