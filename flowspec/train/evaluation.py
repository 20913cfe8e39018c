"""What each evaluation measures and draws with the evaluation (EMA) weights, as the spec's `eval` settings
say: test bits/dim on the first `images` test images, the inversion error on a test batch, and a grid of
`samples` images per temperature. Batches go to the device one at a time from the CPU, under
`torch.no_grad`, so an evaluation needs about the memory of one forward pass at its batch; a stop signal
ends it between batches (`StoppedBySignal`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from flowspec.spec import EvalSpec
from flowspec.train.distributed import Dist
from flowspec.train.evaluate import inversion_error, single_sample_bpd
from flowspec.train.memory import PeakMemory
from flowspec.train.progress import Meter
from flowspec.train.sampling import grid_name, save_grid
from flowspec.train.signals import StopCheck, never

INVERSION_IMAGES = 64  # at most: the inversion check runs on one batch
SMOKE = EvalSpec(images=64, samples=16, temperatures=(1.0,), inversion=False)  # a short run's evaluation

Meters = Callable[[str, int, str], Meter]  # label, total, unit -> the progress of one pass


@dataclass
class Evaluation:
    """What one evaluation measured: test bits/dim, the inversion error, sample grids and its cost."""

    test_bpd: float
    inversion_error: float  # nan on ranks other than 0, and when the check is off
    grids: dict[float, Path]  # temperature -> sample grid (rank 0 only)
    images: int  # test images measured
    seconds: float
    memory: str  # the peak memory while it ran, in words


def describe(settings: EvalSpec, test_images: int) -> str:
    """The cost of an evaluation in words: `64 of 10000 test images at batch 64, one 16-image grid, ...`."""
    images = min(settings.images or test_images, test_images)
    grids = len(settings.temperatures) if settings.samples else 0
    drawn = f"{'one' if grids == 1 else grids} {settings.samples}-image grid{'s' if grids > 1 else ''}"
    return (
        f"{images} of {test_images} test images at batch {settings.batch}, "
        f"{drawn if grids else 'no sample grid'}, "
        f"{'an' if settings.inversion else 'no'} inversion check"
    )


@dataclass
class Evaluator:
    """Evaluates a model on `test_images` (kept on the CPU) and draws its samples into `run_dir/samples`.

    The training RNG is never moved: everything runs under a forked RNG seeded from `seed`, so an
    evaluation (or its absence) changes nothing in the training that follows.
    """

    test_images: torch.Tensor
    settings: EvalSpec  # with its batch set
    device: torch.device
    dist: Dist
    run_dir: Path
    levels: int
    seed: int

    def __call__(
        self, model: torch.nn.Module, step: int, meters: Meters | None = None, stop: StopCheck = never
    ) -> Evaluation:
        settings, batch = self.settings, self.settings.batch
        images = self.test_images[: settings.images]
        devices = [self.device] if self.device.type == "cuda" else []
        started, memory = time.monotonic(), PeakMemory(self.device)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + 1)
            meter = meters("eval", len(images), "test images") if meters else None
            try:
                test_bpd = single_sample_bpd(model, images, batch, self.device, self.dist, meter, stop)
            finally:
                if meter:
                    meter.close()
            inverse, grids = float("nan"), {}
            if self.dist.main:
                if settings.inversion:
                    checked = images[: min(INVERSION_IMAGES, batch)]
                    inverse = inversion_error(model, checked, self.device, stop)
                if settings.samples:
                    grids = self._draw(model, step, meters, stop)
        return Evaluation(test_bpd, inverse, grids, len(images), time.monotonic() - started, str(memory))

    def _draw(self, model: torch.nn.Module, step: int, meters: Meters | None, stop: StopCheck):
        settings, grids = self.settings, {}
        meter = meters("samples", settings.samples * len(settings.temperatures), "images") if meters else None
        try:
            for temperature in settings.temperatures:
                path = self.run_dir / "samples" / grid_name(step, temperature)
                try:
                    grids[temperature] = save_grid(
                        model, settings.samples, temperature, path, self.levels, self.seed,
                        settings.batch, stop, meter,
                    )  # fmt: skip
                except ValueError:  # samples that are not finite (a model gone wrong): no grid, not a crash
                    continue
        finally:
            if meter:
                meter.close()
        return grids
