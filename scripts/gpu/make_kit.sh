#!/usr/bin/env bash
# Builds .gpu-kit/ (ignored by git): what a GPU machine without Ray needs to run
# scripts/gpu/check.sh. A bare GPU image (CPython 3.12 with torch, botorch,
# gpytorch, pyarrow, safetensors, scikit-learn, nvidia-ml-py, pytest) may have
# no Ray, jsonschema or pydantic and reach no package registry. To keep the kit
# small (the Ray wheel alone is 79 MB), it holds Ray's installed tree without
# the libraries the checks never import (RLlib, Serve, LLM, the Java jars),
# xz-compressed (about 30 MB), plus the other missing packages as wheels.
#
#   bash scripts/gpu/make_kit.sh            # where PyPI is reachable
#   bash scripts/gpu/check.sh               # then on the GPU machine, .gpu-kit/ included
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=.gpu-kit
PY=${PYTHON_VERSION:-3.12}
pin() { grep -i "^$1==" requirements/constraints.txt | head -1; }
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
fetch() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" \
    --implementation cp "${platforms[@]}" -d "$KIT/download" "$@"
}
rm -rf "$KIT" && mkdir -p "$KIT/download" "$KIT/wheels"
grep -qx '/.gpu-kit/' .git/info/exclude 2>/dev/null || echo '/.gpu-kit/' >> .git/info/exclude

fetch "$(pin ray)"
tree=$(mktemp -d)
unzip -q "$KIT"/download/ray-*.whl -d "$tree"  # unzip keeps the binaries' exec bits
rm -rf "$tree"/ray/{rllib,serve,llm,jars}  # ray.air imports ray.data: it stays
tar -C "$tree" -cf - . | xz -6 -T0 > "$KIT/ray-site.tar.xz"
rm -rf "$tree" "$KIT"/download/ray-*.whl

for name in jsonschema jsonschema-specifications referencing rpds-py pydantic pydantic_core \
            annotated-types typing-inspection typing_extensions; do
  fetch "$(pin "$name")"
done
mv "$KIT"/download/*.whl "$KIT/wheels/" && rmdir "$KIT/download"
du -sh "$KIT" && ls "$KIT" "$KIT/wheels"
