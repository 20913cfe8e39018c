"""Helpers of the training tests: tiny specs built in Python, their updaters, and synthetic `.npz` data."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flowspec.spec import DataSpec, FlowSpec, Interval, TrainSpec
from flowspec.steps.coupling import CouplingStep
from flowspec.steps.flip import FlipStep
from flowspec.steps.norm import NormStep
from flowspec.steps.pointwise import PointwiseStep
from flowspec.steps.repeat import RepeatStep
from flowspec.steps.split import SplitStep

if TYPE_CHECKING:  # torch only where a test asks for an updater (the language tools' tests run without it)
    from torch import Tensor

    from flowspec.train.update import Updater

#: the lock line a run in another process wrote (`RunLock` writes `pid N on HOST since ...`)
ELSEWHERE = "pid 4242 on elsewhere since long ago"


@contextmanager
def held_by_another_process(folder: Path) -> Iterator[None]:
    """`folder`'s run lock held by a child process, as a live run elsewhere holds it (a lock this process
    holds is its own, which `check_free` passes)."""
    folder.mkdir(parents=True, exist_ok=True)
    take = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        f"fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'{ELSEWHERE}'); print(flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", take, str(folder / ".lock")], stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()  # locked
        yield
    finally:
        holder.kill()
        holder.wait()


def tiny_spec(
    data: DataSpec | None = None,
    steps: int = 8,
    eval_every: int = 1000,
    name: str = "tiny",
    attention: bool = True,
    **train,
) -> FlowSpec:
    """A two-coupling mixture-logistic flow on 1x8x8 digits (or `data`): about 6k parameters."""
    settings = dict(coupling="mixlogistic", components=2, filters=8, blocks=1, heads=2, dropout=0.1)
    settings["attention"] = attention
    body = [NormStep(), PointwiseStep(), CouplingStep(**settings), FlipStep()]
    recipe = dict(
        lr=3e-3,
        batch=16,
        ema=0.9,
        init_batch=64,
        clip_grad_norm=1.0,
        warmup=2,
        length=Interval(count=steps, unit="steps"),
        eval_every=Interval(count=eval_every, unit="steps"),
    )
    return FlowSpec(
        name=name,
        data=data or DataSpec(dataset="digits", shape=(1, 8, 8), levels=17),
        flow=[SplitStep(mask="checkerboard", body=[RepeatStep(count=2, body=body)])],
        train=TrainSpec(**(recipe | train)),
    )


def tiny_updater(spec: FlowSpec) -> tuple[Updater, Tensor]:
    """An `Updater` on the CPU of `spec`'s model (seed 0) initialised on its first 16 training images, and
    those images (a batch)."""
    import torch

    import flowspec
    from flowspec.train.data import load_split
    from flowspec.train.distributed import Dist
    from flowspec.train.update import Updater

    torch.manual_seed(0)
    model = flowspec.build(spec)
    x = load_split(spec.data, "train").images[:16]
    model.initialize(x)
    return Updater(model, spec.train, None, Dist(), torch.device("cpu")), x


def write_shards(
    folder: Path, n_train: int = 256, n_test: int = 64, size: int = 8, channels: int = 1
) -> Path:
    """Synthetic `.npz` shards: smooth ramps with noise, 17 levels, labels 0..3 (easy to learn)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 4, n)
        ramp = np.linspace(0, 12, size)[None, None, :, None] * np.ones((n, size, size, channels))
        flip = labels[:, None, None, None] % 2 == 1
        x = np.where(flip, ramp.transpose(0, 2, 1, 3), ramp) + rng.integers(0, 5, (n, size, size, channels))
        return x.clip(0, 16).astype(np.uint8), labels

    for i, half in enumerate(np.array_split(np.arange(n_train), 2)):
        x, y = images(len(half))
        np.savez(folder / f"train_{i + 1}.npz", x=x, y=y)
    x, y = images(n_test)
    np.savez(folder / "test.npz", x=x, y=y)
    return folder


TINY_FLOW = """\
# a tiny flow for the command-line tests
model {name}
data digits {{ shape 1x8x8  levels 17 }}
preprocess logit(alpha=0.05)
dequantize uniform
defaults {{
  coupling mixlogistic(components=2, filters={filters}, blocks=1, heads=2, dropout=0.1)
  norm element
}}
flow {{
  split checkerboard {{ repeat 2 {{ norm; pointwise; coupling; flip }} }}
}}
prior normal
train {{
  optimizer adam(lr=3e-3)
  warmup 2 steps, then constant
  batch 16  clip_grad_norm 1.0  ema 0.9  init_batch 64  seed 0
  length {steps} steps
  eval every {eval_every} steps
}}
"""


def write_flow(path: Path, name: str = "tiny", filters: int = 8, steps: int = 6, eval_every: int = 3) -> Path:
    """A tiny `.flow` file for the command-line tests."""
    path.write_text(TINY_FLOW.format(name=name, filters=filters, steps=steps, eval_every=eval_every))
    return path
