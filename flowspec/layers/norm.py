"""Affine normalisation with data-dependent init, per element (Flow++) or per channel (actnorm)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowspec.layers.base import DataInit, Layer, State, logdet_dtype


class Norm(Layer, DataInit):
    """y = x g + b with a separate (g, b) for each half of a pair.

    Init over the first batch: g = 1 / sqrt(var + 1e-8), b = -mean g (so y has zero mean, unit variance);
    g is clamped at >= 1e-10; logdet = sum log g over the normalised dimensions.
    """

    def __init__(self, shape: tuple[int, int, int], halves: int, granularity: str = "element"):
        super().__init__()
        self.register_init_flag()
        c, h, w = shape
        self.granularity = granularity
        self.halves = halves
        param_shape = (halves, c, h, w) if granularity == "element" else (halves, c, 1, 1)
        self.repeats = 1 if granularity == "element" else h * w
        self.g = nn.Parameter(torch.ones(param_shape))
        self.b = nn.Parameter(torch.zeros(param_shape))

    def _init(self, xs: tuple[Tensor, ...]) -> None:
        dims = (0,) if self.granularity == "element" else (0, 2, 3)
        with torch.no_grad():
            for i, x in enumerate(xs):
                var, mean = torch.var_mean(x, dim=dims, correction=0)
                g = torch.rsqrt(var + 1e-8)
                self.g[i].copy_(g.view_as(self.g[i]))
                self.b[i].copy_((-mean * g).view_as(self.b[i]))
        self.mark_initialized()

    def _scales(self) -> Tensor:
        return self.g.clamp(min=1e-10)

    def forward(self, x: State, context: Tensor | None = None) -> tuple[State, Tensor]:
        xs = x if isinstance(x, tuple) else (x,)
        if self.needs_init():
            self._init(xs)
        g = self._scales()
        out = tuple(xi * g[i] + self.b[i] for i, xi in enumerate(xs))
        logdet = torch.log(g).sum(dtype=logdet_dtype(xs[0])) * self.repeats
        logdet = logdet.expand(xs[0].shape[0])
        return (out if isinstance(x, tuple) else out[0]), logdet

    def inverse(self, y: State, context: Tensor | None = None) -> State:
        ys = y if isinstance(y, tuple) else (y,)
        g = self._scales()
        out = tuple((yi - self.b[i]) / g[i] for i, yi in enumerate(ys))
        return out if isinstance(y, tuple) else out[0]
