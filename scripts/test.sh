#!/usr/bin/env bash
# Set up (on a fresh machine) and run the test suite. Services the tests need
# (a local Ray cluster, an S3 API server on 127.0.0.1) are started by the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EEIPU_VENV:-.venv}"
TORCH_SPEC="${EEIPU_TORCH_SPEC:-torch==2.13.0}"   # a CPU build; install torch before anything pulls a CUDA one

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "$TORCH_SPEC"
python -m pip install --quiet -c requirements/constraints.txt -e ".[all,test,bench,docs]"

# Debian's Chromium: the report test opens the HTML report in it, headless.
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
export HF_HUB_OFFLINE=1   # T5 models are built from a config or a local path; never downloaded

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"   # loopback-only test clusters
ruff check .
site="$(mktemp -d)"
mkdocs build --strict --site-dir "$site"   # the docs and their API reference
rm -rf "$site"
# Two worker processes (pytest-xdist), each taking whole modules: a module's
# tests share its fixtures (a Ray cluster, a sweep). Many tests wait on process
# and cluster start-up, so two workers finish in about two thirds of the time
# of one on 2 cores. EEIPU_TEST_WORKERS=0 runs the suite in this process.
WORKERS="${EEIPU_TEST_WORKERS:-2}"
set +e
python -m pytest -p no:cacheprovider -n "$WORKERS" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
if [ "$rc" -ne 0 ] || [ "$#" -gt 0 ]; then
  exit "$rc"   # a failing suite, or a run of chosen tests: no lowest-versions step
fi
deactivate
echo "== the fast subset on the lowest allowed versions (scripts/test_lowest.sh)"
exec bash scripts/test_lowest.sh
