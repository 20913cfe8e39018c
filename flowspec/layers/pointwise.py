"""Invertible 1x1 convolution: x @ W on the channels, a separate C x C matrix per half."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowspec.layers.base import Layer, State, logdet_dtype


class Pointwise(Layer):
    """y[c'] = sum_c x[c] W[c, c'] (the official `_nin`); W initialised to I + 0.001 randn.

    logdet = H W log|det W|, computed in float64; the inverse uses the matrix inverse.
    """

    def __init__(self, channels: int, halves: int):
        super().__init__()
        weight = torch.empty(halves, channels, channels)
        if not weight.is_meta:  # counting on the meta device draws nothing
            weight.normal_(0.0, 0.001).add_(torch.eye(channels))
        self.weight = nn.Parameter(weight)

    @staticmethod
    def _mix(x, w):
        """x @ w on the channels, as a batched W^T (N x C x HW): autograd keeps x itself, not a copy."""
        n, c = x.shape[:2]
        return torch.bmm(w.to(x.dtype).t().expand(n, c, c), x.flatten(2)).view(x.shape)

    def forward(self, x: State, context: Tensor | None = None) -> tuple[State, Tensor]:
        xs = x if isinstance(x, tuple) else (x,)
        _, logabsdet = torch.linalg.slogdet(self.weight.double())
        h, w = xs[0].shape[-2:]
        logdet = (h * w * logabsdet.sum()).to(logdet_dtype(xs[0])).expand(xs[0].shape[0])
        out = tuple(self._mix(xi, self.weight[i]) for i, xi in enumerate(xs))
        return (out if isinstance(x, tuple) else out[0]), logdet

    def inverse(self, y: State, context: Tensor | None = None) -> State:
        ys = y if isinstance(y, tuple) else (y,)
        inv = torch.linalg.inv(self.weight.double())
        out = tuple(self._mix(yi, inv[i]) for i, yi in enumerate(ys))
        return out if isinstance(y, tuple) else out[0]
