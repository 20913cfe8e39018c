"""Parameter-free layers: flip the halves, sigmoid, factor out half the channels to the prior."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flowspec.layers.base import Layer, State, sum_per_sample, zero_logdet


class Flip(Layer):
    """Swap the halves of a pair, so the next coupling transforms the other one."""

    def forward(self, x: State, context: Tensor | None = None) -> tuple[State, Tensor]:
        a, b = x
        return (b, a), zero_logdet(a)

    def inverse(self, y: State, context: Tensor | None = None) -> State:
        a, b = y
        return (b, a)


class Sigmoid(Layer):
    """y = sigmoid(x); logdet = sum(-softplus(x) - softplus(-x))."""

    def forward(self, x: State, context: Tensor | None = None) -> tuple[State, Tensor]:
        return torch.sigmoid(x), sum_per_sample(-F.softplus(x) - F.softplus(-x))

    def inverse(self, y: State, context: Tensor | None = None) -> State:
        return torch.logit(y)


class FactorOut(Layer):
    """Keep the first C / 2 channels in the flow; the last C / 2 go to the prior.

    Returns the pair `(kept, factored)`; the enclosing `Sequence` collects the factored part.
    """

    factors_out = True

    def __init__(self, factored_shape: tuple[int, int, int]):
        super().__init__()
        self.factored_shape = factored_shape

    def forward(self, x: State, context: Tensor | None = None) -> tuple[State, Tensor]:
        kept, factored = x.chunk(2, dim=1)
        return (kept, factored), zero_logdet(x)

    def inverse(self, y: State, context: Tensor | None = None) -> State:
        return torch.cat(y, dim=1)
