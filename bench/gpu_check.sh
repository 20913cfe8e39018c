#!/usr/bin/env bash
# The GPU check, in one call (logic in bench/gpu_check.py): the CUDA tests, then Flow++ training speed in
# float32, bf16 and bf16 + torch.compile; rows appended to bench/RESULTS.md (and $OUT/gpu_check.md).
#   bench/gpu_check.sh              # needs a CUDA GPU and the project installed (pip install -e ".[dev]")
#   bench/gpu_check.sh --dry-run    # or GPU_CHECK_DRY_RUN=1: CPU only, in about a minute
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"  # no cd: relative --results and --spec stay the caller's
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's flowspec, installed or not
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
if ! "$python" -c "import torch, lark, pydantic, typer, pytest, flowspec.cli" 2>/dev/null; then
  echo "gpu_check: $python cannot import torch, lark, pydantic, typer, pytest and flowspec.cli; install the" \
    "project (pip install -e \".[dev]\"), or name the python that has it: PYTHON=/path/to/python $0" >&2
  exit 2
fi
if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]]; then set -- --dry-run "$@"; fi
printf -v GPU_CHECK_COMMAND "%q " "$0" "$@"  # the header's command, as typed
export GPU_CHECK_COMMAND="${GPU_CHECK_COMMAND% }"
# gpu_check.py keeps to a budget of at most 450 s; the hard limit stops it at 8 minutes whatever happens
# (SIGINT at 470 s: it appends what it measured; SIGKILL 10 s later)
exec timeout --signal=INT --kill-after=10 470 "$python" "$root/bench/gpu_check.py" "$@"
