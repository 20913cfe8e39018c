"""Dropout with cheap masks that can be drawn ahead of the computation that uses them.

On a CPU other than Intel's, `bernoulli_` draws its numbers one by one through a slow path, which made
dropout about a tenth of a Flow++ training step. Here each element gets 32 random bits, compared with
the keep probability (exact to 2^-32): `random_` fills int64s over their whole range, read as pairs of
int32s (about 4x faster than `bernoulli_`; a 31-bit `random_` per element was 1.3x slower than this). The
masks come from torch's default generator, so seeding and resumed runs reproduce them exactly. A mask is
a uint8 tensor of 0s and 1s, so autograd keeps 1 byte per element for it instead of a float; multiplying
a bf16 tensor by it ran 4x faster than by the same mask as bool (whose conversion to bf16 is slow).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Dropout(nn.Dropout):
    """`nn.Dropout` that can also apply a mask drawn beforehand by `draw`."""

    @property
    def scale(self) -> float:
        """What kept elements are multiplied by."""
        return 1.0 / (1.0 - self.p)

    def active(self) -> bool:
        return self.training and self.p > 0

    def draw(self, shape: torch.Size | tuple[int, ...], device: torch.device | str) -> Tensor | None:
        """A keep-mask for an input of `shape`, or None when dropout is off (eval mode or p = 0)."""
        if not self.active():
            return None
        if torch.compiler.is_compiling():  # in-place random_ breaks the graph; compiled code has its own RNG
            bits = torch.randint(0, 2**31, shape, dtype=torch.int32, device=device)
            return (bits < round((1.0 - self.p) * 2**31)).to(torch.uint8)
        numel = math.prod(shape)
        words = torch.empty((numel + 1) // 2, dtype=torch.int64, device=device).random_(-(2**63), None)
        bits = words.view(torch.int32)[:numel].view(shape)  # uniform on [-2^31, 2^31)
        return (bits < min(round((1.0 - self.p) * 2**32) - 2**31, 2**31 - 1)).view(torch.uint8)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if not self.active():
            return x
        if mask is None:
            mask = self.draw(x.shape, x.device)
        return x * mask * self.scale
