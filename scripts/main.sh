#!/usr/bin/env bash
# Set up (on a fresh machine) and run the main job: a real sweep on a local Ray
# cluster with the embedded local-directory prefix cache.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EEIPU_VENV:-.venv}"
TORCH_SPEC="${EEIPU_TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "$TORCH_SPEC"
python -m pip install --quiet -c requirements/constraints.txt -e .

export RAY_AIR_NEW_OUTPUT=0
exec eeipu-ray run regression \
  --budget "${EEIPU_BUDGET:-30}" \
  --warmup 8 \
  --cache "${EEIPU_CACHE_DIR:-$PWD/.eeipu-cache}" \
  --storage-path "$PWD/results" \
  "$@"
