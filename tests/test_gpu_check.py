"""The GPU check's dry run: bench/gpu_check.sh runs its CPU-side logic on the CPU (tiny model, 2 steps)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_dry_run_trains_every_configuration_and_appends_its_rows(tmp_path):
    results = tmp_path / "RESULTS.md"
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_DRY_RUN="1", OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    command = ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--skip-tests", "--results", str(results)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    text = results.read_text()
    assert "`bench/gpu_check.sh --dry-run` (GPU check)" in text and "bf16 peak measured" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(("| fp32", "| bf16"))]
    assert [(r[0], r[1]) for r in rows] == [
        ("| bf16 + compile", "4"),
        ("| fp32", "4"),
        ("| bf16", "4"),
        ("| bf16 + compile + keep", "4"),
        ("| bf16 + keep", "4"),
        ("| bf16 + compile", "16"),
    ]  # fmt: skip  (the batches of 64 and 256 shrunk 16-fold in a dry run)
    assert all(float(r[3]) > 0 and r[5].endswith("%") and r[6].endswith("%") for r in rows), rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_check_refuses_to_run_without_cuda_unless_dry():
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--skip-tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and "no CUDA device here" in done.stderr and "--dry-run" in done.stderr


def test_gpu_check_runs_the_flowspec_of_its_own_checkout(tmp_path):
    """On a GPU machine the project is often not installed (its checkout is copied there): the script
    puts its checkout on the import path. Here a copy of the checkout runs its own flowspec, not the
    installed one."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    copy = tmp_path / "checkout"
    for name in files.stdout.splitlines():
        if name.startswith(("flowspec/", "bench/", "specs/")) and (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, copy / name)
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    env.pop("PYTHONPATH", None)
    command = [
        "bash",
        str(copy / "bench" / "gpu_check.sh"),
        "--dry-run",
        "--skip-tests",
        "--configs",
        "fp32@64",
    ]
    command += ["--results", str(tmp_path / "RESULTS.md")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"flowspec from {copy / 'flowspec'}" in done.stdout
