"""Interleaved A/B of one Flow++ coupling network (10 blocks, 3x32x16 input, dropout 0.2): another flowspec
source tree (e.g. `git archive main flowspec | tar -x -C /tmp/base`) against this one, a fresh process per
row, with a matmul's and the blocks' convolution's GFLOP/s measured in the same process right after it.

    python bench/compare_network.py THREADS ROUNDS BASE_DIR
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flowpp import commit, machine  # noqa: E402

ROW = r"""
import json, sys, time
import torch
import torch.nn.functional as F
from flowspec.layers.networks import FlowppNetwork

threads, task, precision = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(threads)
torch.manual_seed(0)
net = FlowppNetwork((3, 32, 16), 3 * 98, filters=96, blocks=10, heads=4, attention=True, dropout=0.2)
n = 8 if task == "train" else 64
x = torch.randn(n, 3, 32, 16)
net.train(task == "train")
dtype = torch.bfloat16 if precision == "bf16" else torch.float32


def call():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        if task == "train":
            net(x).float().square().mean().backward()
        else:
            with torch.no_grad():
                net(x)


def rate(fn, flop, repeats=5):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return flop * repeats / (time.perf_counter() - start) / 1e9


call()
start = time.perf_counter()
call()
seconds = time.perf_counter() - start
a, b = (torch.randn(1024, 1024, dtype=dtype) for _ in range(2))
xc = torch.randn(8, 192, 32, 16, dtype=dtype).contiguous(memory_format=torch.channels_last)
w = torch.randn(96, 192, 3, 3, dtype=dtype)
print(json.dumps({
    "seconds": seconds,
    "img_s": n / seconds,
    "matmul": rate(lambda: a @ b, 2 * 1024**3),
    "conv": rate(lambda: F.conv2d(xc, w, padding=1), 2 * 8 * 512 * 96 * 192 * 9),
}))
"""


def main() -> None:
    threads, rounds, base = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    trees = {"base": base, "this": str(Path(__file__).resolve().parent.parent)}
    print(
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · `{shlex.join(['python', *sys.argv])}`\n"
        f"machine: {machine()} · torch {version('torch')} · threads {threads} · this flowspec {commit()} "
        f"against {base}",
        flush=True,
    )
    for round_ in range(rounds):
        for task in ("train", "forward"):
            for precision in ("fp32", "bf16"):
                for name, tree in trees.items():
                    env = {"PYTHONPATH": tree, "OMP_NUM_THREADS": threads, "PATH": "/usr/bin:/bin"}
                    done = subprocess.run(
                        [sys.executable, "-c", ROW, threads, task, precision],
                        capture_output=True, text=True, env=env, cwd="/tmp", check=True,
                    )  # fmt: skip
                    r = json.loads(done.stdout.strip().splitlines()[-1])
                    print(
                        f"round {round_} {task:7s} {precision} {name}: {r['seconds']:6.2f} s/call "
                        f"{r['img_s']:6.2f} img/s | {precision} matmul {r['matmul']:4.0f}, "
                        f"conv {r['conv']:4.0f} GFLOP/s",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
