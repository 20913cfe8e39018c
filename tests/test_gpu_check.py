"""The GPU check's dry run: bench/gpu_check.sh runs its CPU-side logic on the CPU (tiny model, 2 steps)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import flowspec

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


def _check(*args: str, cwd=ROOT, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1") | env
    environ.pop("OUT", None) if "OUT" not in env else None
    command = ["bash", str(ROOT / "bench" / "gpu_check.sh"), *args]
    return subprocess.run(command, cwd=cwd, env=environ, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_gpu_check_dry_run_trains_every_configuration_and_appends_its_rows(tmp_path):
    """Run from another folder with a relative --results and an $OUT that does not exist yet: the CUDA
    tests are collected, every configuration trains with `train --recompute auto`'s choice in its name."""
    out = tmp_path / "out" / "new"
    done = _check("--results", "RESULTS.md", cwd=tmp_path, GPU_CHECK_DRY_RUN="1", OUT=str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    text = (tmp_path / "RESULTS.md").read_text()
    assert "gpu_check.sh --dry-run --results RESULTS.md` (GPU check)" in text and "bf16 peak measured" in text
    assert "threads 1" in text and "tests collected" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(("| fp32", "| bf16"))]
    assert [(r[0], r[1]) for r in rows] == [
        ("| bf16 + compile · recompute auto: off", "4"),
        ("| fp32 · recompute auto: off", "4"),
        ("| bf16 · recompute auto: off", "4"),
        ("| bf16 + compile (CUDA graphs) · recompute auto: off", "4"),
        ("| bf16 + compile · recompute off", "4"),
        ("| bf16 · recompute on", "4"),
        ("| bf16 + compile · recompute auto: off", "16"),
    ]  # fmt: skip  (the batches of 64 and 256 shrunk 16-fold in a dry run; a CPU compile keeps auto's choice)
    assert all(float(r[3]) > 0 and r[5].endswith("%") and float(r[6]) > 0 for r in rows), rows
    assert {p.name for p in out.iterdir()} == {"gpu_check.md", "gpu_profile.txt", "pytest_cuda.txt"}
    assert "test_cuda.py" in (out / "pytest_cuda.txt").read_text()
    profiled = (out / "gpu_profile.txt").read_text().splitlines()[0]  # the goal's configuration
    assert profiled.startswith("bf16 + compile · recompute auto: off, batch 4: 3 steps in"), profiled


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "3", "--warmup", "5"], "needs steps > warmup >= 0"),
        (["--steps", "5", "--warmup", "5"], "needs steps > warmup >= 0"),
        (["--warmup", "-1"], "needs steps > warmup >= 0"),
        (["--configs", "bf16@1"], "a batch of at least 2"),
        (["--configs", "bf16+keep+recompute@64"], "at most one of +keep and +recompute"),
        (["--configs", "bf16+graphs@64"], "+graphs only with +compile"),
        (["--budget", "460"], "needs 0 < budget <= 450"),
    ],
)
def test_gpu_check_refuses_impossible_arguments_before_anything_runs(monkeypatch, capsys, args, message):
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", *args])
    monkeypatch.delenv("OUT", raising=False)
    with pytest.raises(SystemExit) as stop:
        gpu_check.parse_args()
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_gpu_check_refuses_an_out_that_is_a_file(monkeypatch, capsys, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    monkeypatch.setenv("OUT", str(tmp_path / "file"))
    with pytest.raises(SystemExit) as stop:
        gpu_check.parse_args()
    assert stop.value.code == 2 and f"$OUT={tmp_path / 'file'} is not a folder" in capsys.readouterr().err


def test_the_dry_run_shrinks_a_batch_to_at_least_two_and_keeps_it_required():
    assert gpu_check.shrunk(gpu_check.Config.parse("bf16@16")).batch == 2
    config = gpu_check.shrunk(gpu_check.Config.parse("bf16@64"))
    assert config.batch == 4 and config.required and config.recompute == "auto"


def test_graphs_compile_the_networks_in_reduce_overhead_mode_and_mark_each_step(monkeypatch):
    """+graphs: the networks compiled with mode="reduce-overhead" (CUDA graphs; a dry run keeps its
    aot_eager backend, which takes no mode), and every step starts a new cudagraph step."""
    from flowspec.model import FlowModel

    config = gpu_check.Config.parse("bf16+compile+graphs@4")
    assert (
        config.graphs and config.compiled and not config.required and config.text == "bf16+compile+graphs@4"
    )
    assert config.name(False) == "bf16 + compile (CUDA graphs) · recompute auto: off"
    assert not gpu_check.Config.parse("bf16+compile@4").graphs
    compiled, marks = [], []
    monkeypatch.setattr(FlowModel, "compile_networks", lambda self, **kwargs: compiled.append(kwargs))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    spec = flowspec.load_spec(ROOT / "specs" / "flowpp_cifar.flow", overrides=gpu_check.DRY_RUN_SHRINK)
    for dry_run, expected in ((False, {"mode": "reduce-overhead"}), (True, {"backend": "aot_eager"})):
        step, _ = gpu_check.training_step(
            spec, torch.device("cpu"), config, argparse.Namespace(dry_run=dry_run)
        )
        step()
        step()
        assert compiled.pop() == expected
    assert len(marks) == 4
    step, _ = gpu_check.training_step(
        spec, torch.device("cpu"), gpu_check.Config.parse("bf16+compile@4"), argparse.Namespace(dry_run=False)
    )
    step()
    assert compiled.pop() == {} and len(marks) == 4


def test_the_profile_records_the_goals_compiled_row_else_an_eager_one_that_trained():
    """The first compiled bf16 configuration that trained, if there is time to compile it again; else the
    first eager bf16 one that trained; a row that failed or was skipped is never profiled."""
    configs = [gpu_check.Config.parse(c) for c in ("fp32@64", "bf16@64", "bf16+compile@64", "bf16+keep@64")]
    args = argparse.Namespace(configs=configs, dry_run=False)
    trained = [gpu_check.Row(c.text, c.batch, seconds=1.0) for c in configs]
    compiled = gpu_check.NEEDED_SECONDS["profile"] + gpu_check.COMPILE_SECONDS
    assert gpu_check.profiled_config(args, trained, compiled) is configs[2]
    assert gpu_check.profiled_config(args, trained, compiled - 1) is configs[1]
    assert gpu_check.profiled_config(args, trained, gpu_check.NEEDED_SECONDS["profile"] - 1) is None
    failed = [*trained[:2], gpu_check.Row("bf16+compile@64", 64, note="failed: ..."), trained[3]]
    assert gpu_check.profiled_config(args, failed, 1000) is configs[1]
    skipped = [trained[0], gpu_check.Row("bf16@64", 64), failed[2], trained[3]]
    assert gpu_check.profiled_config(args, skipped, 1000) is configs[3]
    dry_run = argparse.Namespace(configs=configs, dry_run=True)
    assert gpu_check.profiled_config(dry_run, trained, 0) is configs[2]


def test_time_estimates_scale_with_steps_and_batch_and_the_hard_limit_is_8_minutes():
    args = argparse.Namespace(steps=50)
    assert gpu_check.needed_seconds(gpu_check.Config.parse("bf16@64"), args) == 75
    assert gpu_check.needed_seconds(gpu_check.Config.parse("bf16@256"), args) == 300
    assert gpu_check.needed_seconds(gpu_check.Config.parse("bf16@64"), argparse.Namespace(steps=10)) == 15
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "timeout --signal=INT --kill-after=10 470 " in script and gpu_check.BUDGET <= 470


def test_only_modules_marking_cuda_tests_are_collected():
    """A module without cuda tests that cannot be imported on the GPU machine must not fail the check."""
    files = gpu_check.cuda_test_files()
    assert "tests/test_cuda.py" in files and "tests/test_ddp.py" in files
    assert "tests/test_code.py" not in files and "tests/test_gpu_check.py" not in files


def test_gpu_check_sh_needs_every_dependency_not_only_lazy_flowspec(tmp_path):
    (tmp_path / "typer.py").write_text("raise ImportError('no typer here')\n")
    done = _check("--dry-run", "--skip-tests", "--configs", "fp32@32", "--results", str(tmp_path / "R.md"),
                  PYTHONPATH=str(tmp_path))  # fmt: skip
    assert done.returncode == 2 and "cannot import torch, lark, pydantic, typer" in done.stderr
    assert "PYTHON=/path/to/python" in done.stderr  # how to name the python that has them
    assert not (tmp_path / "R.md").exists()


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
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (an unpacked sdist has none)")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    copy = tmp_path / "checkout"
    for name in files.stdout.splitlines():
        if name.startswith(("flowspec/", "bench/")) and (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, copy / name)
    (copy / "specs").symlink_to(os.readlink(ROOT / "specs"))  # the specs are the package's
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


def test_after_the_time_limit_the_rest_are_listed_and_a_missing_required_row_fails(monkeypatch, tmp_path):
    """SIGINT (gpu_check.sh's hard limit) during bf16@64: that row says so, the later ones are listed as
    not run, the table is still appended, and the check fails (bf16@64 is required)."""
    real = gpu_check.train_steps

    def train_steps(spec, device, config, args):
        if config.precision == "bf16":
            raise KeyboardInterrupt
        return real(spec, device, config, args)

    monkeypatch.setattr(gpu_check, "train_steps", train_steps)
    monkeypatch.delenv("OUT", raising=False)
    results = tmp_path / "R.md"
    argv = ["gpu_check.py", "--dry-run", "--skip-tests", "--results", str(results), "--configs"]
    monkeypatch.setattr(sys, "argv", [*argv, "fp32@64", "bf16@64", "bf16+keep@64"])
    with pytest.raises(SystemExit) as stop:
        gpu_check.main()
    assert stop.value.code == 1
    rows = [
        line.split(" | ")
        for line in results.read_text().splitlines()
        if line.startswith(("| fp32", "| bf16"))
    ]
    assert [r[0] for r in rows] == [
        "| fp32 · recompute auto: off",
        "| bf16 · recompute auto",
        "| bf16 · recompute off",
    ]
    assert float(rows[0][3]) > 0 and "s in all" in rows[0][-1]
    assert (
        rows[1][-1] == "stopped by the time limit |" and rows[2][-1] == "not run: stopped by the time limit |"
    )


def test_device_wheels_refuses_an_environment_without_the_packages_before_writing(tmp_path):
    """bench/device_wheels.sh pins the wheels to an environment's versions: one that lacks some of the
    seven packages is refused, naming them, before .whl/ or git's exclude list is touched."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho lark==1.3.1\necho torch==2.14.1\n")  # what `-m pip freeze` prints
    fake.chmod(0o755)
    exclude = ROOT / ".git" / "info" / "exclude"
    before = exclude.read_text() if exclude.is_file() else None
    command = ["bash", str(ROOT / "bench" / "device_wheels.sh")]
    done = subprocess.run(command, env=dict(os.environ, PYTHON=str(fake)), capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"device_wheels: {fake} has 1 of the 7 packages (lark, pydantic, ")
    assert "PYTHON=/path/to/python" in done.stderr
    assert (exclude.read_text() if exclude.is_file() else None) == before
