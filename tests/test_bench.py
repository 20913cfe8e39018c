"""The benchmark scripts run end to end on a tiny spec and append their tables where they are told."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT


def _run(script: str, *args: str, returncode: int = 0) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, str(ROOT / "bench" / script), "--threads", "1", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == returncode, done.stdout + done.stderr
    return done.stdout + done.stderr


def _rows(text: str) -> list[list[str]]:
    """The markdown table rows after the header row and its rule."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [line.strip("| ").split(" | ") for line in lines[1:]]


def _tables(text: str) -> list[str]:
    """profile_step's three tables: by kind of work, by op and by step."""
    kinds, rest = text.split("the ops that took most time")
    return [kinds, *rest.split("time by spec step")]


@pytest.mark.slow
def test_bench_flowpp_times_every_task_and_appends_its_rows(tmp_path):
    results = tmp_path / "RESULTS.md"
    tiny = ["--init-batch", "2", "--warmup", "1", "--repeats", "1", "--precision", "fp32"]
    sizes = ["--train-batch", "2", "--logprob-batch", "2", "--sample", "2"]
    _run("bench_flowpp.py", "--spec", "specs/quickstart.flow", *tiny, *sizes, "--results", str(results))
    text = results.read_text()
    assert "--spec specs/quickstart.flow" in text and "threads 1" in text
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.stdout.strip():  # the checkout measured (an unpacked sdist is none)
        assert f"flowspec {head.stdout.strip()} ·" in text
    rows = _rows(text)
    assert [row[:3] for row in rows] == [
        ["train", "fp32", "2"],
        ["log_prob", "fp32", "2"],
        ["sample", "fp32", "2"],
    ]
    assert all(float(row[4]) > 0 and row[-1].endswith("%") for row in rows), rows


@pytest.mark.slow
def test_profile_step_splits_a_call_into_kinds_of_work(tmp_path):
    results = tmp_path / "RESULTS.md"
    options = ["--task", "log_prob", "--precision", "bf16", "--batch", "2"]  # bf16: the chunked attention
    _run("profile_step.py", "--spec", "specs/quickstart.flow", *options, "--results", str(results))
    kinds, ops, steps = _tables(results.read_text())
    assert "quickstart.flow log_prob at batch 2, bf16" in kinds
    rows = {row[0]: row for row in _rows(kinds)}
    assert list(rows)[:3] == ["convolution", "attention", "dense matmul"]
    assert int(rows["attention"][2].rstrip("%")) > 0  # the custom op's matmuls and softmax count as attention
    assert sum(int(row[2].rstrip("%")) for row in rows.values()) in range(98, 103)  # shares, each rounded
    assert len(_rows(ops)) == 12  # --top's default
    assert any(row[1] == "attention" for row in _rows(ops))  # an op named, inside the attention kernel
    assert "| step | written at | seconds | share |" in steps  # log_prob: no parts, no optimizer
    assert [row[0] for row in _rows(steps)][-1] == "(no step: loss, prior, gradient accumulation)"


@pytest.mark.slow
def test_profile_step_splits_a_training_step_into_forward_backward_and_optimizer(tmp_path):
    results = tmp_path / "RESULTS.md"
    _run("profile_step.py", "--spec", "specs/quickstart.flow", "--batch", "2", "--top", "30",
         "--results", str(results))  # fmt: skip
    kinds, ops, steps = _tables(results.read_text())
    header = "| work | seconds | share | forward | backward | optimizer | GFLOP | GFLOP/s |"
    assert header in kinds
    for row in _rows(kinds):  # the three parts add up to the whole, each rounded to 0.01 s
        assert abs(sum(float(c) for c in row[3:6]) - float(row[1])) <= 0.02, row
    rows = _rows(ops)
    assert len(rows) == 30 and [float(r[3]) for r in rows] == sorted(
        (float(r[3]) for r in rows), reverse=True
    )
    parts = {row[0]: [float(c) for c in row[5:8]] for row in rows}
    assert parts["aten::convolution_backward"][1] > 0 == parts["aten::convolution_backward"][0]
    assert parts["aten::mkldnn_convolution"][0] > 0 == parts["aten::mkldnn_convolution"][1]
    rows = _rows(steps)  # each written step in model order, then the rest
    names = [row[0] for row in rows]
    assert names[:3] == [
        "dequantize (UniformDequantizer)",
        "preprocess logit(alpha=0.05)",
        "split checkerboard",
    ]
    assert names[-2:] == ["(no step: loss, prior, gradient accumulation)", "optimizer"]
    coupling = rows[names.index("· coupling mixlogistic k4 f16 b1 h4 x2")]  # the first split's, inside it
    assert coupling[1] == "quickstart.flow:17"
    assert float(coupling[5]) > float(coupling[4]) > 0  # its backward is found
    optimizer = [float(c) for c in rows[-1][4:7]]
    assert optimizer[2] > 0 == optimizer[0] + optimizer[1]
    assert sum(float(row[3].rstrip("%")) for row in rows) == pytest.approx(100, abs=1)


def test_profile_step_tells_the_parts_of_a_training_step_apart():
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from profile_step import phase
    from torch.profiler import profile

    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(layer.parameters(), foreach=True)
    with profile() as prof:
        layer(torch.ones(4, 3)).sum().backward()
        optimizer.step()
    parts = {(event.name, phase(event)) for event in prof.events()}
    assert ("aten::addmm", "forward") in parts and ("aten::mm", "backward") in parts
    assert any(name.startswith("aten::_foreach") and part == "optimizer" for name, part in parts), parts
    assert ("autograd::engine::evaluate_function: AddmmBackward0", "backward") in parts  # the engine's range
    assert any(name.startswith("Optimizer.step") and part == "optimizer" for name, part in parts), parts


def test_profile_step_gives_backward_work_to_the_step_whose_forward_made_it():
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from profile_step import OUTSIDE, enclosing_step, forward_steps, step_ranges
    from torch.profiler import profile

    first, second = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)
    first.spec_path, second.spec_path = "flow.0", "flow.1"
    model = torch.nn.Sequential(first, torch.nn.Tanh(), second)
    with step_ranges(model), profile() as prof:
        model(torch.ones(4, 3)).sum().backward()
    assert not first._forward_pre_hooks and not first._forward_hooks  # the ranges are gone after
    steps = forward_steps(prof.events())
    found: dict[tuple[str, str], set[str]] = {}
    for event in prof.events():
        found.setdefault((event.name, enclosing_step(event, steps)), set()).add(event.name)
    assert ("aten::addmm", "flow.0") in found and ("aten::addmm", "flow.1") in found  # forward, by range
    assert ("aten::tanh", OUTSIDE) in found  # a module with no step
    assert ("aten::mm", "flow.0") in found and ("aten::mm", "flow.1") in found  # backward, by sequence number
    assert ("aten::tanh_backward", OUTSIDE) in found and ("aten::sum", OUTSIDE) in found
    assert ("torch::autograd::AccumulateGrad", OUTSIDE) in found


def test_no_append_writes_nowhere(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = _run(
        "bench_data.py", "--sizes", "0.001", "--batches", "2", "--batch", "4", "--image", "3x8x8",
        "--tmp", str(tmp_path), "--results", str(results), "--no-append",
    )  # fmt: skip
    assert "reading training data" in out and "stream" in out
    assert not results.exists()


def test_bench_flowpp_keeps_going_past_a_failed_measurement_and_says_why(tmp_path):
    """A measurement that fails is a row saying why (the child's error printed), the others are measured
    and appended, and the run exits non-zero. Piped, the table's cells are not cut at 80 columns."""
    results = tmp_path / "RESULTS.md"
    tiny = ["--init-batch", "2", "--warmup", "1", "--repeats", "1", "--precision", "fp32", "--sample", "0"]
    sizes = ["--train-batch", "0", "2", "--logprob-batch", "0"]  # log_prob at batch 0: none (as --sample 0)
    out = _run("bench_flowpp.py", "--spec", "specs/quickstart.flow", *tiny, *sizes, "--results", str(results),
               returncode=1)  # fmt: skip
    assert "train fp32 at batch 0 failed:" in out and "Traceback" in out
    assert "kernels now (matmul / conv)" in out  # one header cell, unbroken
    rows = _rows(results.read_text())
    assert [row[:3] for row in rows] == [["train", "fp32", "0"], ["train", "fp32", "2"]]
    assert rows[0][3].startswith("failed: ValueError") and float(rows[1][4]) > 0


def test_peak_memory_is_in_gb_everywhere():
    """`ru_maxrss` is KiB: bench_flowpp divided it by 1e6 and bench_data by 2**20, both labelled GB."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_flowpp import kib_to_gb

    assert kib_to_gb(1_000_000) == 1.024
    for script in ("bench_flowpp.py", "bench_data.py"):
        assert "ru_maxrss /" not in (ROOT / "bench" / script).read_text()


@pytest.mark.parametrize(
    ("compile_", "device", "called", "scope"),
    [
        ("device", "cpu", ["compile_for_device"], "elementwise"),
        ("networks", "cpu", ["compile_networks"], "networks"),
        ("elementwise", "cpu", ["fuse_elementwise"], "elementwise"),
        ("device", "cuda", None, "networks"),
        (None, "cpu", [], None),
    ],
)
def test_bench_flowpp_compiles_what_compile_names(monkeypatch, compile_, device, called, scope):
    """--compile alone does what train --compile does on the device; `networks` or `elementwise` compile
    that on any device, and the header names it."""
    import argparse

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_flowpp

    from flowspec.model import FlowModel

    args = argparse.Namespace(
        compile=compile_, device=device, spec=str(ROOT / "specs" / "quickstart.flow"), threads=1,
        init_batch=2, recompute="off", warmup=0, repeats=1,
    )  # fmt: skip
    assert (bench_flowpp.compiled_scope(args) if compile_ else None) == scope
    if device != "cpu":
        return
    calls = []
    for method in ("compile_networks", "fuse_elementwise", "compile_for_device"):
        monkeypatch.setattr(FlowModel, method, lambda self, *a, name=method, **k: calls.append(name))
    monkeypatch.setattr(bench_flowpp, "reference", lambda args, precision: {})
    row = bench_flowpp.measure(args, "log_prob", 2, "fp32")
    assert row["img_per_s"] > 0
    assert calls == called


def test_compare_network_prints_its_command_and_machine_first():
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare_network.py"), "1", "0", "/tmp/base"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "compare_network.py 1 0 /tmp/base`" in done.stdout and "threads 1" in done.stdout
    assert "machine: " in done.stdout and "this flowspec " in done.stdout
