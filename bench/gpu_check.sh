#!/usr/bin/env bash
# The GPU check, in one call (logic in bench/gpu_check.py): the CUDA tests, then Flow++ training speed in
# float32, bf16 and bf16 + torch.compile; rows appended to bench/RESULTS.md (and $OUT/gpu_check.md).
#   bench/gpu_check.sh              # needs a CUDA GPU and the project installed (pip install -e ".[dev]")
#   bench/gpu_check.sh --dry-run    # or GPU_CHECK_DRY_RUN=1: CPU only, in seconds
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's flowspec, installed or not
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
if ! "$python" -c "import flowspec, pytest" 2>/dev/null; then
  echo "gpu_check: $python cannot import flowspec and pytest; install the project: pip install -e \".[dev]\"" >&2
  exit 2
fi
if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]]; then set -- --dry-run "$@"; fi
# gpu_check.py keeps to a 450 s budget; the hard limit stops it at 8 minutes whatever happens
exec timeout --signal=INT --kill-after=10 480 "$python" bench/gpu_check.py "$@"
