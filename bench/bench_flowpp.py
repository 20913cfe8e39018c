"""Benchmark a compiled spec (default: the full Flow++ CIFAR-10 model).

Times a training step (forward, backward, Adam) at each --train-batch, log_prob at --logprob-batch
(no grad, eval mode) and sampling --sample images, in images per second, with the peak memory of each
(every measurement runs in a fresh subprocess, so its peak resident memory is its own). Prints a table
and appends it, with the exact command and the machine, to bench/RESULTS.md.

    python bench/bench_flowpp.py                         # CPU, 2 threads, float32
    python bench/bench_flowpp.py --device cuda --autocast bf16
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
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"


def measure(args: argparse.Namespace, task: str, batch: int) -> dict:
    """One measurement, run in this process: returns img/s, seconds per call and peak memory in GB."""
    import torch

    import flowspec

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = flowspec.build(flowspec.load_spec(args.spec)).to(device)
    shape = model.spec.data.shape
    x = torch.randint(0, model.spec.data.levels, (batch, *shape), device=device)
    model.initialize(x[: args.init_batch])
    if args.autocast != "none":
        model.set_autocast(torch.bfloat16 if args.autocast == "bf16" else torch.float16)
    if args.compile:
        model.compile_networks()

    if task == "train":
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

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

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        call()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.repeats):
        call()
    sync()
    seconds = (time.perf_counter() - start) / args.repeats
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 1e9
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
    return {"task": task, "batch": batch, "seconds": seconds, "img_per_s": batch / seconds, "peak_gb": peak}


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spec", default=str(ROOT / "specs" / "flowpp_cifar.flow"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-batch", type=int, nargs="*", default=[8, 16])
    parser.add_argument("--logprob-batch", type=int, default=64)
    parser.add_argument("--sample", type=int, default=16)
    parser.add_argument("--init-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--compile", action="store_true", help="torch.compile the coupling networks")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: task:batch, run in a subprocess
    args = parser.parse_args()

    if args.one:
        task, batch = args.one.split(":")
        print(json.dumps(measure(args, task, int(batch))))
        return

    import torch
    from rich.console import Console
    from rich.table import Table

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    jobs = [("train", b) for b in args.train_batch] + [("log_prob", args.logprob_batch)]
    if args.sample:
        jobs.append(("sample", args.sample))
    load_before = os.getloadavg()
    rows = []
    for task, batch in jobs:
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--one", f"{task}:{batch}"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    load_after = os.getloadavg()

    precision = "float32" if args.autocast == "none" else f"{args.autocast} autocast"
    malloc = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    precision += f" · MALLOC_MMAP_THRESHOLD_={malloc}" if malloc else ""
    header = (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · `{command}`\n\n"
        f"machine: {machine()} · device {args.device} · torch {torch.__version__} · threads {args.threads} · "
        f"{precision}{' · compiled' if args.compile else ''} · load average before/after "
        f"{load_before[0]:.2f}/{load_after[0]:.2f}"
    )
    table = Table(title=f"{Path(args.spec).name}")
    for col in ("task", "batch", "s / call", "img/s", "peak memory (GB)"):
        table.add_column(col, justify="right")
    lines = ["| task | batch | s / call | img/s | peak memory (GB) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        cells = [
            r["task"],
            str(r["batch"]),
            f"{r['seconds']:.2f}",
            f"{r['img_per_s']:.2f}",
            f"{r['peak_gb']:.2f}",
        ]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    logprob = next(r for r in rows if r["task"] == "log_prob")
    sample = next((r for r in rows if r["task"] == "sample"), None)
    ratio = ""
    if sample:
        ratio = f"sampling costs {logprob['img_per_s'] / sample['img_per_s']:.2f}x log_prob per image"
    console = Console()
    console.print(header)
    console.print(table)
    if ratio:
        console.print(ratio)
    if not args.no_append:
        with RESULTS.open("a") as f:
            f.write(f"\n### {header}\n\n" + "\n".join(lines) + (f"\n\n{ratio}\n" if ratio else "\n"))


if __name__ == "__main__":
    main()
