#!/usr/bin/env bash
# The wheels a GPU machine without a package index needs beside its own torch (Python 3.12, x86-64):
# lark, pydantic with its parts, and typer, at the versions of this checkout's environment, into .whl/
# (ignored by git) for the device tool to carry. About 3 MB. Then, on that machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site bash bench/gpu_check.sh
#   bench/device_wheels.sh                    # PYTHON=... for another environment's versions
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
[[ -x "$python" ]] || python=python3
wanted='lark|pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions|typer'
mapfile -t pins < <("$python" -m pip freeze | grep -iE "^($wanted)==")
if ((${#pins[@]} != 7)); then
  echo "device_wheels: $python has ${#pins[@]} of the 7 packages (lark, pydantic, pydantic-core," \
    "annotated-types, typing-inspection, typing-extensions, typer); install the project in it" \
    "(pip install -e \".[dev]\") or name one that has it: PYTHON=/path/to/python $0" >&2
  exit 2
fi
exclude="$(git rev-parse --git-path info/exclude)"  # a worktree's .git is a file
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
rm -rf .whl
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${pins[@]}"
ls .whl
