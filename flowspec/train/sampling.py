"""Sample grids: images drawn from a model in batches, upscaled (nearest neighbour) to a size a person can
see, encoded with torchvision's `save_image` (Pillow) and written whole."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torchvision.utils import make_grid, save_image

from flowspec.errors import UserError
from flowspec.train.evaluate import stop_point
from flowspec.train.files import replaced_whole
from flowspec.train.signals import StopCheck, never

if TYPE_CHECKING:
    from flowspec.model import FlowModel

#: A grid is at least this many pixels wide: small images are enlarged by a whole factor.
MIN_GRID_WIDTH = 256
PADDING = 2


def grid_name(step: int, temperature: float) -> str:
    """The file name of a grid drawn at `step` and `temperature`: `step0000400_t0.8.png`."""
    return f"step{step:07d}_t{temperature}.png"


def _layout(n: int, width: int) -> tuple[int, int]:
    """Images per grid row, and the whole factor that enlarges each so the grid is `MIN_GRID_WIDTH` wide."""
    nrow = max(1, math.ceil(math.sqrt(n)))
    per_image = (MIN_GRID_WIDTH - PADDING) / min(nrow, n) - PADDING  # grid width: columns * (w + pad) + pad
    return nrow, max(1, math.ceil(per_image / width))


def grid_image(images: torch.Tensor, levels: int) -> torch.Tensor:
    """Integer images (N x C x H x W, values 0..levels-1) as one C x H' x W' grid in [0, 1], square-ish,
    each image enlarged by the smallest whole factor that makes the grid `MIN_GRID_WIDTH` pixels wide."""
    nrow, scale = _layout(len(images), images.shape[-1])
    big = images.float().cpu().repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    return make_grid(big / (levels - 1), nrow=nrow, padding=PADDING, pad_value=1.0)


def check_grid_memory(n: int, shape: tuple[int, int, int], have: int) -> None:
    """Refuse (a `UserError`) a grid of `n` images of `shape` whose making would need more than `have`
    bytes: about four float32 copies of the enlarged images are alive at once."""
    channels, height, width = shape
    _, scale = _layout(n, width)
    need = 4 * 4 * n * channels * (height * scale + PADDING) * (width * scale + PADDING)
    if need > have:
        from flowspec.units import fmt_bytes

        raise UserError(
            f"-n {n:,} draws a grid of {n:,} images that needs about {fmt_bytes(need)} to make, and this "
            f"process can still take {fmt_bytes(have)} of cpu memory: draw fewer images, or pass "
            "--allow-large to go ahead anyway"
        )


@torch.no_grad()
def save_grid(
    model: FlowModel,
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
    generator = (
        torch.Generator().manual_seed(seed) if seed is not None else None
    )  # one seed, one grid: any device
    batch = batch or n
    parts = []
    for start in range(0, n, batch):
        stop_point(stop, f"after {start} of {n} samples at temperature {temperature}")
        parts.append(model.sample(min(batch, n - start), temperature=temperature, generator=generator))
        if progress:
            progress(len(parts[-1]))
    stop_point(stop, f"after all {n} samples at temperature {temperature}, before writing")
    images = torch.cat(parts)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = _encoded(grid_image(images, levels), path.suffix)
    with replaced_whole(path) as partial:
        partial.write_bytes(encoded)  # raises on a short write (a full disk), which Pillow's encoders miss
    return path


def _encoded(grid: torch.Tensor, suffix: str) -> bytes:
    """`grid` as the bytes of an image file of the type `suffix` names (`.png`, `.jpg`, ...)."""
    from PIL import Image

    buffer = io.BytesIO()
    save_image(grid, buffer, format=Image.registered_extensions()[suffix.lower()])
    return buffer.getvalue()
