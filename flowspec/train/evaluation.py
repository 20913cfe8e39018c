"""What every evaluation interval measures and draws with the evaluation (EMA) weights: test bits/dim,
the inversion error on a test batch, and sample grids at a few temperatures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flowspec.train.distributed import Dist
from flowspec.train.evaluate import inversion_error, single_sample_bpd
from flowspec.train.sampling import grid_name, save_grid

SAMPLE_TEMPERATURES = (1.0, 0.8)
SAMPLES_PER_GRID = 64
INVERSION_IMAGES = 64


@dataclass
class Evaluation:
    test_bpd: float
    inversion_error: float  # nan on ranks other than 0
    grids: dict[float, Path]  # temperature -> sample grid (rank 0 only)


@dataclass
class Evaluator:
    """Evaluates a model on `test_images` and draws its samples into `run_dir/samples`.

    The training RNG is never moved: everything runs under a forked RNG seeded from `seed`, so an
    evaluation (or its absence) changes nothing in the training that follows.
    """

    test_images: torch.Tensor
    batch: int
    device: torch.device
    dist: Dist
    run_dir: Path
    levels: int
    seed: int

    def __call__(self, model: torch.nn.Module, step: int) -> Evaluation:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + 1)
            test_bpd = single_sample_bpd(model, self.test_images, self.batch, self.device, self.dist)
            inverse, grids = float("nan"), {}
            if self.dist.main:
                inverse = inversion_error(model, self.test_images[:INVERSION_IMAGES], self.device)
                for temperature in SAMPLE_TEMPERATURES:
                    path = self.run_dir / "samples" / grid_name(step, temperature)
                    grids[temperature] = save_grid(
                        model, SAMPLES_PER_GRID, temperature, path, self.levels, self.seed
                    )
        return Evaluation(test_bpd, inverse, grids)
