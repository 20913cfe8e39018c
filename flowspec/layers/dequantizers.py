"""Dequantizers: integer images x -> continuous v = x + u, u in [0, 1), with log q(u | x)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowspec.layers.base import Sequence, autocast, standard_normal_log_prob


class UniformDequantizer(nn.Module):
    """u ~ U[0, 1); log q = 0."""

    spec_path = "dequantize"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u = torch.rand_like(x)
        return x + u, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)


class VariationalDequantizer(nn.Module):
    """u = flow(eps; context(x)), eps ~ N(0, I); the flow ends with a sigmoid, so u lies in (0, 1).

    log q(u | x) = log N(eps) - logdet of the flow. `autocast_dtype` runs the context network under
    torch.autocast (its features feed the couplings' networks only); log q stays in eps's dtype.
    """

    spec_path = "dequantize"

    def __init__(self, context_net: nn.Module, flow: Sequence):
        super().__init__()
        self.context_net = context_net
        self.flow = flow
        self.autocast_dtype: torch.dtype | None = None

    def noise(self, eps: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """u and log q(u | x) for the given standard normal noise eps."""
        with autocast(x, self.autocast_dtype):
            context = self.context_net(x)
        u, logdet = self.flow(eps, context)
        return u, standard_normal_log_prob(eps) - logdet

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u, log_q = self.noise(torch.randn_like(x), x)
        return x + u, log_q
