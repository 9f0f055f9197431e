#!/usr/bin/env bash
# Set up .venv, then the linters, the type checker and both test tiers: the quick one first (about a minute),
# then the slow one (real processes, faults, launches). Arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PATH="$PWD/.venv/bin:$PATH"
.venv/bin/ruff check .
.venv/bin/pyright --project pyproject.toml
.venv/bin/python -m pytest -q -m "not slow" "$@"
.venv/bin/python -m pytest -q -m slow "$@"
