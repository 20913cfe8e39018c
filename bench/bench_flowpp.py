"""Benchmark a compiled spec (default: the full Flow++ CIFAR-10 model).

Times a training step (forward, backward, Adam) at each --train-batch, log_prob at --logprob-batch
(no grad, eval mode) and sampling --sample images, in each --precision, in images per second and in
GFLOP/s of the model's counted work, with the peak memory of each (every measurement runs in a fresh
subprocess, so its peak resident memory is its own). Beside each row: what the device's kernels reach at
that moment in that precision (a 2048^3 matmul and the blocks' 3x3 convolution, measured right after
the task in the same process, since a shared machine's speed drifts) and the fraction of the faster of
the two that the task reaches. Prints a table and appends it, with the exact command and the machine, to
bench/RESULTS.md.

    python bench/bench_flowpp.py                                  # CPU, 2 threads, fp32 and bf16
    python bench/bench_flowpp.py --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
REFERENCE_REPEATS = 10  # timed calls of each reference kernel (after two untimed)
sys.path.insert(0, str(ROOT))  # this checkout's flowspec, not whichever is installed


def commit() -> str:
    """This checkout's commit (`git rev-parse --short HEAD`), or "unknown" (no git, not a repository)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def kib_to_gb(kib: int) -> float:
    """`ru_maxrss` (KiB on Linux) in GB (1e9 bytes), the unit of every peak memory column."""
    return kib * 1024 / 1e9


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock times are the device's."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, task: str, batch: int, precision: str) -> dict:
    """One measurement, run in this process: img/s, seconds per call, peak memory in GB, and the kernel
    rates of `reference` measured right after it."""
    import torch

    import flowspec
    from flowspec.allocator import keep_freed_memory
    from flowspec.train.precision import autocast_dtype, resolve_precision
    from flowspec.train.schedule import build_optimizer

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as train, eval and sample do
    torch.manual_seed(0)
    device = torch.device(args.device)
    precision = resolve_precision(precision, device)[0]
    model = flowspec.build(flowspec.load_spec(args.spec)).to(device)
    shape = model.spec.data.shape
    x = torch.randint(0, model.spec.data.levels, (batch, *shape), device=device)
    model.initialize(x[: args.init_batch])
    model.set_autocast(autocast_dtype(precision))
    model.set_recompute(args.recompute == "on")
    if args.compile == "networks":
        model.compile_networks()
    elif args.compile == "elementwise":
        model.fuse_elementwise()
    elif args.compile:
        model.compile_for_device()  # whole networks on a GPU, the elementwise chains on a CPU

    if task == "train":
        model.train()
        opt = build_optimizer(model.parameters(), model.spec.train)  # fused Adam, as training

        def call() -> None:
            opt.zero_grad(set_to_none=True)
            (-model.log_prob(x).mean()).backward()
            opt.step()

    elif task == "log_prob":
        model.eval()

        def call() -> None:
            with torch.no_grad():
                model.log_prob(x)

    else:
        model.eval()

        def call() -> None:
            model.sample(batch, generator=None)

    for _ in range(args.warmup):
        call()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.repeats):
        call()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.repeats
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        peak = kib_to_gb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    row = {"task": task, "precision": precision, "batch": batch, "seconds": seconds, "peak_gb": peak}
    return row | {"img_per_s": batch / seconds} | reference(args, precision)


def reference(args: argparse.Namespace, precision: str) -> dict:
    """What this device reaches in `precision` at the same thread count, in GFLOP/s: a 2048^3 matrix
    product and the Flow++ block's 3x3 convolution (8 x 192 x 32 x 16 channels-last, 96 out)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def gflops(fn, flop: int) -> float:
        fn()
        fn()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(REFERENCE_REPEATS):
            fn()
        synchronize(device)
        return flop * REFERENCE_REPEATS / (time.perf_counter() - start) / 1e9

    a, b = (torch.randn(2048, 2048, device=device, dtype=dtype) for _ in range(2))
    x = torch.randn(8, 192, 32, 16, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(96, 192, 3, 3, device=device, dtype=dtype)
    return {
        "matmul": gflops(lambda: a @ b, 2 * 2048**3),
        "conv": gflops(lambda: F.conv2d(x, w, padding=1), 2 * 8 * 32 * 16 * 96 * 192 * 9),
    }


def forward_gflop_per_image(spec_path: str, overrides: tuple[str, ...] = ()) -> float:
    """Forward GFLOP per image of the spec (convolutions, dense layers, attention), as `inspect` counts."""
    import flowspec
    from flowspec.inspection import inspect_model

    spec = flowspec.load_spec(spec_path, overrides=overrides)
    footer = inspect_model(flowspec.build(spec), spec).footer
    return (footer.flops_flow + footer.flops_dequantize) / 1e9


def report(
    title: str, header: str, columns: Sequence[str], rows: Sequence[Sequence[str]], results: Path | None
) -> None:
    """Print the rows as a table under `header` (the first column left-aligned, numbers right) and append
    header and rows as markdown to `results` (none if None)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for cells in rows:
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console = Console(width=None if sys.stdout.isatty() else 200)  # piped: no cells cut at 80 columns
    console.print(header)
    console.print(table)
    if results is not None:
        with results.open("a") as f:
            f.write(f"\n### {header}\n\n" + "\n".join(lines) + "\n")


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def compiled_scope(args: argparse.Namespace) -> str:
    """What --compile compiled: the networks or the elementwise chains."""
    if args.compile != "device":
        return args.compile
    import torch

    from flowspec.model import compile_scope

    return compile_scope(torch.device(args.device))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spec", default=str(ROOT / "specs" / "flowpp_cifar.flow"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "auto"], default=["fp32", "bf16"])
    parser.add_argument("--train-batch", type=int, nargs="*", default=[8])
    parser.add_argument("--logprob-batch", type=int, default=64, help="log_prob batch (default 64; 0: none)")
    parser.add_argument("--sample", type=int, default=64, help="images sampled (default 64; 0: none)")
    parser.add_argument("--init-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--compile",
        nargs="?",
        const="device",
        choices=["device", "networks", "elementwise"],
        help="as train --compile (device: the coupling networks on a GPU, their elementwise chains on a "
        "CPU), or the networks or the chains on any device",
    )
    parser.add_argument(
        "--recompute",
        choices=["on", "off"],
        default="off",
        help="on: training recomputes (selective checkpointing)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="file to append to (bench/RESULTS.md)")
    parser.add_argument("--no-append", action="store_true", help="print only; append nowhere")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: task:batch:precision, in a subprocess
    args = parser.parse_args()

    if args.one:
        task, batch, precision = args.one.split(":")
        print(json.dumps(measure(args, task, int(batch), precision)))
        return

    import torch

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    jobs = [("train", b) for b in args.train_batch]
    if args.logprob_batch:
        jobs.append(("log_prob", args.logprob_batch))
    if args.sample:
        jobs.append(("sample", args.sample))

    def run_one(task: str, batch: int, precision: str) -> dict:
        """One measurement in a fresh process; a failed one is said (its error's last lines) and kept."""
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--one", f"{task}:{batch}:{precision}"],
            capture_output=True, text=True,
        )  # fmt: skip
        if out.returncode == 0:
            return json.loads(out.stdout.strip().splitlines()[-1])
        tail = out.stderr.strip().splitlines()[-20:] or [f"exit {out.returncode}"]
        print(f"{task} {precision} at batch {batch} failed:", *tail, sep="\n", file=sys.stderr, flush=True)
        return {"task": task, "precision": precision, "batch": batch, "failed": tail[-1][:200]}

    load_before = os.getloadavg()
    rows = [run_one(task, batch, precision) for task, batch in jobs for precision in args.precision]
    load_after = os.getloadavg()
    gflop = forward_gflop_per_image(args.spec)

    header = (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · `{command}`\n\n"
        f"machine: {machine()} · device {device_name(args.device)} · torch {torch.__version__} · flowspec "
        f"{commit()} · threads {args.threads}"
        f"{f' · compiled ({compiled_scope(args)})' if args.compile else ''} · recompute {args.recompute}"
        " · load average before/after "
        f"{load_before[0]:.2f}/{load_after[0]:.2f}\n\n"
        f"the model does {gflop:.1f} GFLOP per image forward (log_prob; sampling counted the same), "
        f"{3 * gflop:.1f} per training image (forward + backward ~ 3x); kernels now: a 2048^3 matmul and the "
        f"blocks' 3x3 conv in the row's precision, measured right after the row's task; of ceiling: the "
        f"task's GFLOP/s over the faster of the two"
    )
    columns = (
        "task", "precision", "batch", "s / call", "img/s", "GFLOP/s", "peak memory (GB)",
        "kernels now (matmul / conv)", "of ceiling",
    )  # fmt: skip
    cells = []
    for r in rows:
        if "failed" in r:
            cells.append([r["task"], r["precision"], str(r["batch"]), f"failed: {r['failed']}", *[""] * 5])
            continue
        rate = r["img_per_s"] * gflop * (3 if r["task"] == "train" else 1)
        cells.append([
            r["task"],
            r["precision"],
            str(r["batch"]),
            f"{r['seconds']:.2f}",
            f"{r['img_per_s']:.2f}",
            f"{rate:.0f}",
            f"{r['peak_gb']:.2f}",
            f"{r['matmul']:.0f} / {r['conv']:.0f}",
            f"{rate / max(r['matmul'], r['conv']):.0%}",
        ])  # fmt: skip
    report(Path(args.spec).name, header, columns, cells, None if args.no_append else args.results)
    if any("failed" in r for r in rows):
        sys.exit(1)


def device_name(device: str) -> str:
    """`device`, with the GPU's name and CUDA version on a CUDA device."""
    import torch

    if not device.startswith("cuda"):
        return device
    return f"{device} ({torch.cuda.get_device_name(torch.device(device))}, CUDA {torch.version.cuda})"


if __name__ == "__main__":
    main()
