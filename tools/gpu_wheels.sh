#!/usr/bin/env bash
# The Python packages castseg needs that the lent GPU machine's image lacks (it has torch,
# transformers, safetensors, scipy, opencv, matplotlib, tensorboard, tqdm, rich, pyyaml, onnx),
# downloaded here into .whl/ (ignored by git) for its Python 3.12, x86-64. The versions are this
# checkout's .venv's, so both machines run the same evaluator and config code.
#   tools/gpu_wheels.sh                 # then: device run with carry [".whl"] (benchmarks/gpu_long_budget.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo "/.whl/" >> .git/info/exclude; }
pkgs=()
for name in faster-coco-eval pycocotools pydantic pydantic_core annotated-types typing-inspection typing_extensions; do
    version=$("$py" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    [ -n "$version" ] || { echo "gpu_wheels: $name is not installed in $py (run make install first)" >&2; exit 1; }
    pkgs+=("$name==$version")
done
rm -rf .whl && mkdir .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pkgs[@]}" 2>&1 | grep -v "^WARNING: Location" || true
n=$(ls .whl/*.whl | wc -l)
[ "$n" -eq "${#pkgs[@]}" ] || { echo "gpu_wheels: got $n wheels for ${#pkgs[@]} packages: $(ls .whl)" >&2; exit 1; }
echo "gpu_wheels: ${pkgs[*]} -> .whl ($(du -sh .whl | cut -f1))"
