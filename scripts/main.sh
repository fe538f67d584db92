#!/usr/bin/env bash
# Set up (on a fresh machine) and run the main job: an EEIPU sweep of the T5
# fine-tuning + distillation pipeline (a tiny T5 built from a config, the toy
# dataset shipped in the repo) on a local Ray cluster with the embedded
# local-directory prefix cache; prints where the report is.
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
python -m pip install --quiet -c requirements/constraints.txt -e ".[t5,report]"

export HF_HUB_OFFLINE=1   # the model is built from a config (or a local path); nothing is downloaded
exec eeipu-ray run "${EEIPU_PIPELINE:-t5}" \
  --budget "${EEIPU_BUDGET:-150}" \
  --warmup 6 \
  --cache "${EEIPU_CACHE_DIR:-$PWD/.eeipu-cache}" \
  --storage-path "$PWD/results" \
  "$@"
