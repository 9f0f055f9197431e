#!/usr/bin/env bash
# Set up .venv and run the main job end to end on a small embedded default:
# synthetic images -> make-shards -> extract-targets -> verify-targets -> pretrain -> export (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PATH="$PWD/.venv/bin:$PATH"
rm -rf demo  # the demo's own output directory
.venv/bin/cae2 demo --out demo
