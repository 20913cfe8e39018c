"""Sample grids: images drawn from a model, saved with torchvision's `save_image`."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.utils import save_image

from flowspec.errors import naming


@torch.no_grad()
def save_grid(model, n: int, temperature: float, path: Path, levels: int, seed: int | None = None) -> Path:
    """Draw `n` images at `temperature` (seeded when `seed` is given) and save them as one grid."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    images = model.sample(n, temperature=temperature, generator=generator)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = max(1, math.ceil(math.sqrt(n)))
    with naming(path):
        save_image(images.float().cpu() / (levels - 1), path, nrow=nrow, padding=1)
    return path
