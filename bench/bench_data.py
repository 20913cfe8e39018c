"""Peak memory of streaming training batches against the size of the data set.

For each --sizes (GB) a uint8 array of --image images (N x H x W x C, as the official Flow++ `.npy` files)
is written in chunks to a temporary folder through a memory map, then a fresh process reads --batches
batches of --batch through the streaming path (`StreamingBatches`, --workers worker processes) and reports
its peak resident memory (`resource.getrusage`: the process itself, and the largest worker). With
--memory-mode, the smallest set is also read through the in-memory path for contrast. Prints a table and
appends it, with the exact command, the machine, torch version and threads, to bench/RESULTS.md.

    python bench/bench_data.py                           # 0.25, 1 and 2.5 GB of 3x64x64 images
    python bench/bench_data.py --sizes 0.5 4 --batches 500
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flowpp import RESULTS, commit, kib_to_gb, machine, report  # noqa: E402

CHUNK = 64 << 20


def write_array(path: Path, count: int, shape: tuple[int, int, int]) -> None:
    """count x H x W x C uint8 images, written CHUNK bytes at a time through a memory map."""
    c, h, w = shape
    array = np.lib.format.open_memmap(path, "w+", np.uint8, (count, h, w, c))
    rows = max(1, CHUNK // (c * h * w))
    pattern = np.random.default_rng(0).integers(0, 256, (rows, h, w, c), dtype=np.uint8)
    for start in range(0, count, rows):
        n = min(rows, count - start)
        array[start : start + n] = pattern[:n] + np.uint8(start % 251)
        array.flush()
    del array


def measure(args: argparse.Namespace, folder: Path, mode: str) -> dict:
    """In this (fresh) process: --batches batches through `mode` (stream or memory), peak memory."""
    import torch

    from flowspec.spec import DataSpec
    from flowspec.train.batches import BatchStream, in_memory
    from flowspec.train.data import load_split
    from flowspec.train.stream import StreamingBatches

    torch.set_num_threads(args.threads)
    c, h, w = args.shape
    data = DataSpec(dataset="npy", path=str(folder), shape=(c, h, w))
    train = load_split(data, "train")
    rss_before = kib_to_gb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    if mode == "stream":
        source = StreamingBatches(train.file, args.batch, seed=0, workers=args.workers)
    else:
        source = BatchStream(in_memory(train, "cpu"), args.batch, seed=0)
    start = time.perf_counter()
    checksum = 0
    for _ in range(args.batches):
        checksum += int(next(source)[:, 0, 0, 0].sum())
    seconds = time.perf_counter() - start
    del source
    gc.collect()
    time.sleep(0.5)  # let the workers exit, so their peak is in RUSAGE_CHILDREN
    return {
        "mode": mode,
        "images": len(train),
        "gb": train.images.numel() / 1e9,
        "batches_per_s": args.batches / seconds,
        "mb_per_s": args.batches * args.batch * c * h * w / seconds / 1e6,
        "rss_start_gb": rss_before,
        "peak_gb": kib_to_gb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
        "worker_peak_gb": kib_to_gb(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss),
        "checksum": checksum,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 1.0, 2.5], help="data set sizes, GB")
    parser.add_argument("--image", default="3x64x64", help="C x H x W")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-mode", action="store_true", help="also read the smallest set in memory")
    parser.add_argument("--tmp", default=None, help="folder for the generated arrays (default: the system's)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="file to append to (bench/RESULTS.md)")
    parser.add_argument("--no-append", action="store_true", help="print only; append nowhere")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: mode:folder, run in a subprocess
    parser.add_argument("--write", help=argparse.SUPPRESS)  # internal: count:path, run in a subprocess
    args = parser.parse_args()
    args.shape = tuple(int(d) for d in args.image.split("x"))

    if args.write:
        count, path = args.write.split(":", 1)
        write_array(Path(path), int(count), args.shape)
        return
    if args.one:
        mode, folder = args.one.split(":", 1)
        print(json.dumps(measure(args, Path(folder), mode)))
        return

    import torch

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    image_bytes = int(np.prod(args.shape))
    rows = []
    for i, size in enumerate(sorted(args.sizes)):
        folder = Path(tempfile.mkdtemp(prefix="flowspec-bench-data-", dir=args.tmp))
        try:
            for name, count in (("train", int(size * 1e9) // image_bytes), ("test", 16)):
                subprocess.run(  # another process: a child's peak memory starts at its parent's
                    [sys.executable, __file__, *sys.argv[1:], "--write", f"{count}:{folder / name}.npy"],
                    check=True,
                )
            modes = ["stream"] + (["memory"] if args.memory_mode and i == 0 else [])
            for mode in modes:
                out = subprocess.run(
                    [sys.executable, __file__, *sys.argv[1:], "--one", f"{mode}:{folder}"],
                    capture_output=True, text=True,
                )  # fmt: skip
                if out.returncode == 0:
                    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                else:  # said, kept as a row, and the rest still measured
                    tail = out.stderr.strip().splitlines()[-20:] or [f"exit {out.returncode}"]
                    print(f"{mode} of {size} GB failed:", *tail, sep="\n", file=sys.stderr)
                    rows.append({"mode": mode, "size": size, "failed": tail[-1][:200]})
                print(rows[-1], flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    header = (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · `{command}`\n\n"
        f"machine: {machine()} · torch {torch.__version__} · flowspec {commit()} · threads {args.threads} · "
        f"workers {args.workers} · {args.batches} batches of {args.batch} {args.image} uint8 images · "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    columns = (
        "path", "images", "data (GB)", "epochs read", "batches/s", "MB/s", "RSS before batches (GB)",
        "peak RSS, main (GB)", "peak RSS, worker (GB)",
    )  # fmt: skip
    cells = [
        [r["mode"], "", f"{r['size']:g}", f"failed: {r['failed']}", *[""] * 5]
        if "failed" in r
        else [
            r["mode"], f"{r['images']:,}", f"{r['gb']:.2f}", f"{args.batches * args.batch / r['images']:.2f}",
            f"{r['batches_per_s']:.0f}", f"{r['mb_per_s']:.0f}", f"{r['rss_start_gb']:.2f}",
            f"{r['peak_gb']:.2f}",
            f"{r['worker_peak_gb']:.2f}" if r["mode"] == "stream" else "",
        ]
        for r in rows
    ]  # fmt: skip
    report("reading training data", header, columns, cells, None if args.no_append else args.results)
    if any("failed" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
