"""Logit preprocessing: dequantized data v in [0, levels) -> logit(alpha + (1 - 2 alpha) v / levels)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from flowspec.layers.base import Layer, State, sum_per_sample


class LogitPreprocess(Layer):
    """Its log-det is part of the bound, so `log_prob` bounds the discrete data."""

    def __init__(self, alpha: float, levels: int):
        super().__init__()
        self.alpha = alpha
        self.levels = levels
        self.scale = (1.0 - 2.0 * alpha) / levels

    def forward(self, v: State, context: Tensor | None = None) -> tuple[State, Tensor]:
        y = self.alpha + self.scale * v
        rest = self.alpha + self.scale * (
            self.levels - v
        )  # 1 - y, exact and >= alpha even where y rounds to 1
        out = torch.log(y) - torch.log(rest)
        logdet = sum_per_sample(-torch.log(y) - torch.log(rest)) + v[0].numel() * math.log(self.scale)
        return out, logdet

    def inverse(self, z: State, context: Tensor | None = None) -> State:
        return (torch.sigmoid(z) - self.alpha) / self.scale

    @property
    def domain(self) -> tuple[float, float]:
        """The open interval of v whose logit is finite: (-alpha, 1 - alpha) / scale, what `inverse` gives."""
        return -self.alpha / self.scale, (1.0 - self.alpha) / self.scale

    def inverse_logdet(self, z: Tensor) -> Tensor:
        """log |det dv/dz| of `inverse` per sample, finite even where sigmoid(z) rounds to 0 or 1."""
        return sum_per_sample(F.logsigmoid(z) + F.logsigmoid(-z)) - z[0].numel() * math.log(self.scale)
