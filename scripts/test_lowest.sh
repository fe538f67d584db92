#!/usr/bin/env bash
# Install the lowest versions pyproject.toml allows for the core dependencies
# (in .venv-lowest) and run a fast subset of the tests on them: the floors are
# claims, and this checks them. torch stays at EEIPU_TORCH_SPEC (the package
# index's older torch builds are CUDA builds of several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EEIPU_LOWEST_VENV:-.venv-lowest}"
TORCH_SPEC="${EEIPU_TORCH_SPEC:-torch==2.13.0}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "$TORCH_SPEC"
lowest="$(mktemp)"
python scripts/lowest_requirements.py --skip torch > "$lowest"
# The test tools at the versions the main suite uses.
grep -i -E '^(pytest|pytest-timeout|hypothesis|iniconfig|pluggy|pygments|sortedcontainers)==' \
  requirements/constraints.txt >> "$lowest"
echo "lowest allowed versions:"; sed 's/^/  /' "$lowest"
python -m pip install --quiet -r "$lowest"
python -m pip install --quiet --no-deps -e .
python -m pip check || true   # reported, not fatal: the floors of transitive packages are theirs
rm -f "$lowest"

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
# The S3 tests need the s3 and test extras (moto), which this environment leaves out.
python -m pytest -p no:cacheprovider -q -k "not s3" \
  tests/search/test_acquisition.py tests/search/test_engine.py tests/search/test_models.py \
  tests/pipeline/test_runner.py tests/cache/test_prefix_cache.py \
  tests/tune/test_trainable_sweep.py \
  "$@"
