#!/usr/bin/env bash
# The GPU checks, as one command for a GPU machine:
#   1. nvidia-smi and the versions seen;
#   2. the real GPU tests (tests/gpu: NVML energy of GPU work, measured joules per
#      stage from the runner on CUDA, fits_device_memory on the real GPU, a Ray
#      Tune trial given one GPU and metered on it) and the CNN's CUDA test;
#   3. CNN learning curves recorded on CUDA with NVML joules
#      (benchmarks/energy_replay.py record --device cuda), for replaying SM2
#      against ASHA offline, where Ray is (energy_replay.py replay --traces ...).
# Everything lands in $OUT (default /tmp/gpu-out). With .gpu-kit/ in the
# repository root (scripts/gpu/make_kit.sh), Ray and the other packages the GPU
# image lacks are unpacked first.
#   RECORD_SECONDS (default 200): time for step 3; CONFIGS (default 200) at most;
#   DEVICE (default cuda): cpu runs the same steps on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_AIR_NEW_OUTPUT=0
PYTHON=${PYTHON:-python3}
started=$(date +%s)
if [ -d .gpu-kit ]; then
  SITE=/tmp/eeipu-gpu-site
  rm -rf "$SITE" && mkdir -p "$SITE"
  tar -xJf .gpu-kit/ray-site.tar.xz -C "$SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$SITE" .gpu-kit/wheels/*.whl
  export PYTHONPATH="$SITE:$PWD"
else
  export PYTHONPATH="$PWD"
fi
echo "kit ready after $(( $(date +%s) - started )) s" | tee "$OUT/check.log"
{ nvidia-smi || echo "no nvidia-smi"; } > "$OUT/nvidia-smi.txt" 2>&1
"$PYTHON" - <<'PY' 2>&1 | tee -a "$OUT/check.log"
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "ray", "botorch", "gpytorch", "pynvml", "pyarrow", "sklearn", "eeipu_ray"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as exc:  # report every missing piece, then go on
        print(name, "FAILED:", repr(exc))
import torch
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
"$PYTHON" -m pytest -p no:cacheprovider -q -rs tests/gpu \
  "tests/pipelines/test_cnn.py::test_runs_on_cuda_and_agrees_with_cpu" 2>&1 \
  | tee "$OUT/pytest.txt"
tests_rc=${PIPESTATUS[0]}
echo "tests exit $tests_rc after $(( $(date +%s) - started )) s" | tee -a "$OUT/check.log"
"$PYTHON" benchmarks/energy_replay.py record --device "${DEVICE:-cuda}" \
  --configs "${CONFIGS:-200}" --max-seconds "${RECORD_SECONDS:-200}" \
  --out "$OUT/gpu_traces.jsonl" 2>&1 | tail -5 | tee -a "$OUT/check.log"
record_rc=${PIPESTATUS[0]}
echo "record exit $record_rc after $(( $(date +%s) - started )) s" | tee -a "$OUT/check.log"
exit $(( tests_rc != 0 || record_rc != 0 ))
