"""Sample grids: images drawn from a model in batches, upscaled (nearest neighbour) to a size a person can
see, saved with torchvision's `save_image`."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from flowspec.errors import naming
from flowspec.train.evaluate import stop_point
from flowspec.train.signals import StopCheck, never

#: A grid is at least this many pixels wide: small images are enlarged by a whole factor.
MIN_GRID_WIDTH = 256
PADDING = 2


def grid_name(step: int, temperature: float) -> str:
    """The file name of a grid drawn at `step` and `temperature`: `step0000400_t0.8.png`."""
    return f"step{step:07d}_t{temperature}.png"


def grid_image(images: torch.Tensor, levels: int) -> torch.Tensor:
    """Integer images (N x C x H x W, values 0..levels-1) as one C x H' x W' grid in [0, 1], square-ish,
    each image enlarged by the smallest whole factor that makes the grid `MIN_GRID_WIDTH` pixels wide."""
    n, width = len(images), images.shape[-1]
    nrow = max(1, math.ceil(math.sqrt(n)))
    columns = min(nrow, n)
    per_image = (MIN_GRID_WIDTH - PADDING) / columns - PADDING  # grid width: columns * (w + pad) + pad
    scale = max(1, math.ceil(per_image / width))
    big = images.float().cpu().repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    return make_grid(big / (levels - 1), nrow=nrow, padding=PADDING, pad_value=1.0)


@torch.no_grad()
def save_grid(
    model,
    n: int,
    temperature: float,
    path: Path,
    levels: int,
    seed: int | None = None,
    batch: int | None = None,
    stop: StopCheck = never,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Draw `n` images at `temperature` (seeded when `seed` is given), `batch` at a time (default all at
    once), and save them as one grid. Before each batch `stop` is asked (`StoppedBySignal` if a signal came);
    `progress` is told each batch's size."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    batch = batch or n
    parts = []
    for start in range(0, n, batch):
        stop_point(stop, f"after {start} of {n} samples at temperature {temperature}")
        parts.append(model.sample(min(batch, n - start), temperature=temperature, generator=generator))
        if progress:
            progress(len(parts[-1]))
    images = torch.cat(parts)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming(path):
        save_image(grid_image(images, levels), path)
    return path
