"""Split a tensor into two halves by a mask and merge them back; the `Split` layer runs a body on the pair.

- stripe: half a = even columns, half b = odd columns (the official Flow++ "CheckerboardSplit");
- checkerboard: half a = pixels with (h + w) even, half b = the others, each packed to width W / 2;
- channel: the first and the last C / 2 channels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowspec.layers.base import Layer, Sequence, State


def _even_rows(x: Tensor) -> Tensor:
    return (torch.arange(x.shape[-2], device=x.device) % 2 == 0).view(-1, 1)


def split(mask: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """The two halves of `x` (N x C x H x W) under `mask`."""
    if mask == "channel":
        a, b = x.chunk(2, dim=1)
        return a, b
    pairs = x.unflatten(-1, (x.shape[-1] // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    if mask == "stripe":
        return even, odd
    rows = _even_rows(x)
    return torch.where(rows, even, odd), torch.where(rows, odd, even)


def merge(mask: str, a: Tensor, b: Tensor) -> Tensor:
    """The inverse of `split`."""
    if mask == "channel":
        return torch.cat([a, b], dim=1)
    if mask == "checkerboard":
        rows = _even_rows(a)
        a, b = torch.where(rows, a, b), torch.where(rows, b, a)
    return torch.stack([a, b], dim=-1).flatten(-2)


class Split(Layer):
    """Split by a mask, run the body on the pair of halves, merge."""

    def __init__(self, mask: str, body: Sequence):
        super().__init__()
        self.mask = mask
        self.body = body

    def forward(self, x: State, context: Tensor | None = None) -> tuple[State, Tensor]:
        pair, logdet = self.body(split(self.mask, x), context)
        return merge(self.mask, *pair), logdet

    def inverse(self, y: State, context: Tensor | None = None) -> State:
        return merge(self.mask, *self.body.inverse(split(self.mask, y), context))
