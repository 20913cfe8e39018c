"""Sample grids: images drawn from a model in batches, saved with torchvision's `save_image`."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.utils import save_image

from flowspec.errors import naming
from flowspec.train.evaluate import stop_point
from flowspec.train.signals import StopCheck, never


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
    once), and save them as one grid. Before each batch `stop` is asked (`Interrupted` if a signal came);
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
    nrow = max(1, math.ceil(math.sqrt(n)))
    with naming(path):
        save_image(images.float().cpu() / (levels - 1), path, nrow=nrow, padding=1)
    return path
