"""Images to the spec's shape and levels: channel conversion, resize and centre crop, colour depth.

Each conversion runs only when the spec's `convert` names it (`mode`, `size`, `depth`); an image that
differs from the spec in a way not asked to be converted is refused with a message naming it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flowspec.errors import UserError
from flowspec.spec import DataSpec

CHANNEL_NAMES = {1: "grey", 2: "grey+alpha", 3: "RGB", 4: "RGBA"}


def prepare(x: torch.Tensor, source_levels: int, data: DataSpec, where: str) -> torch.Tensor:
    """Integer images N x C x H x W with values in [0, source_levels) as the spec's uint8 images.

    `where` names the file (or files) in messages.
    """
    (c, h, w), (want, height, width) = x.shape[1:], data.shape
    missing = [k for k, differs in (("mode", c != want), ("size", (h, w) != (height, width))) if differs]
    missing = [k for k in missing if k not in data.convert]
    if missing:
        asks = f"`convert {missing[0]}`" if len(missing) == 1 else "`convert (mode, size)`"
        raise UserError(
            f"{where}: images of {c}x{h}x{w} ({CHANNEL_NAMES.get(c, f'{c} channels')}) but the spec's data "
            f"shape is {want}x{height}x{width}; add {asks} to the data section to convert them"
        )
    x = _channels(x, data, where)
    if (h, w) != (height, width):
        x = resize_crop(x, height, width)
    return _depth(x, source_levels, data, where)


def _channels(x: torch.Tensor, data: DataSpec, where: str) -> torch.Tensor:
    have, want = x.shape[1], data.shape[0]
    if have == want:
        return x
    if have not in CHANNEL_NAMES or want not in (1, 3):
        raise UserError(
            f"{where}: images of {have} channels cannot be converted to {want} (only to grey or RGB)"
        )
    colour = x[:, :3] if have >= 3 else x[:, :1]  # alpha dropped
    if want == 1 and colour.shape[1] == 3:
        return luma(colour)
    return colour.expand(-1, want, -1, -1) if colour.shape[1] == 1 else colour


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """Grey from RGB with ITU-R 601-2 weights, rounded as Pillow's `convert("L")` does."""
    weights = torch.tensor([19595, 38470, 7471], dtype=torch.int64).view(1, 3, 1, 1)
    return ((rgb.to(torch.int64) * weights).sum(1, keepdim=True) + 32768) >> 16


def resize_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale (bilinear, antialiased) so the image covers height x width, then cut out the centre."""
    h, w = x.shape[2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):  # the filter's weights are positive and sum to 1: values stay in range
        resized = F.interpolate(x.double(), size=size, mode="bilinear", antialias=True, align_corners=False)
        x = resized.round().to(x.dtype)
    top, left = round((size[0] - height) / 2), round((size[1] - width) / 2)
    return x[:, :, top : top + height, left : left + width]


def reduce_depth(x: torch.Tensor, source_levels: int, levels: int) -> torch.Tensor:
    """floor(x * levels / source_levels): for 8-bit to n bits, x // 2**(8 - n) as the official Flow++ code."""
    return torch.div(x.to(torch.int64) * levels, source_levels, rounding_mode="floor")


def _depth(x: torch.Tensor, source_levels: int, data: DataSpec, where: str) -> torch.Tensor:
    if data.levels > 256:
        raise UserError(
            f"{where}: prepared images are 8-bit, so the spec's levels ({data.levels}) must be <= 256 "
            f"(16-bit data: `levels 256` and `convert depth`)"
        )
    if data.levels > source_levels:  # bits/dim against levels the data never had would mean nothing
        raise UserError(
            f"{where}: the images have {source_levels} levels (values 0..{source_levels - 1}) but the spec "
            f"says {data.levels}; write `levels {source_levels}` (the colour depth cannot be raised)"
        )
    if "depth" in data.convert and source_levels != data.levels:
        x = reduce_depth(x, source_levels, data.levels)
    elif x.numel() and int(x.max()) >= data.levels:
        raise UserError(
            f"{where}: values up to {int(x.max())} but the spec says {data.levels} levels "
            f"(values 0..{data.levels - 1}); add `convert depth` to the data section to reduce the "
            f"colour depth"
        )
    return x.to(torch.uint8)
