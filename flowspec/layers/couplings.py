"""Coupling layers: the first half conditions a network whose outputs transform the second half.

Per transformed element the network gives P numbers (official layout: channel c * P + j):
- additive: t;                  y = x + t
- affine: s, t;                 y = exp(tanh s) x + t
- mixlogistic: s, t, K logits, K means, K log-scales (floored at -7);
                                y = exp(tanh s) logit(sum_k pi_k sigmoid((x - mu_k) exp(-l_k))) + t
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from flowspec.layers import mixlogistic
from flowspec.layers.base import Layer, sum_per_sample, zero_logdet


def outputs_per_element(transform: str, components: int) -> int:
    return {"additive": 1, "affine": 2, "mixlogistic": 2 + 3 * components}[transform]


class Coupling(Layer):
    """`forward((a, b)) -> ((a, T(b; net(a))), log|det dT/db|)`.

    `autocast_dtype` runs the network under torch.autocast; the transform and its log-det stay in the
    data's dtype (float32 or float64). `last_inverse_iterations` counts the mixture inverse's iterations.
    """

    def __init__(self, transform: str, network: nn.Module, components: int):
        super().__init__()
        self.transform = transform
        self.network = network
        self.per_element = outputs_per_element(transform, components)
        self.autocast_dtype: torch.dtype | None = None
        self.last_inverse_iterations = 0

    def _params(self, a: Tensor, context: Tensor | None) -> Tensor:
        """Network outputs as N x C x H x W x P, in a's dtype."""
        if self.autocast_dtype is None:
            out = self.network(a, context)
        else:
            with torch.autocast(a.device.type, dtype=self.autocast_dtype):
                out = self.network(a, context)
        return out.unflatten(1, (a.shape[1], self.per_element)).permute(0, 1, 3, 4, 2).to(a.dtype)

    def _mixture(self, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k = (self.per_element - 2) // 3
        logits, means, logscales = p[..., 2 : 2 + k], p[..., 2 + k : 2 + 2 * k], p[..., 2 + 2 * k :]
        return logits, means, logscales.clamp(min=mixlogistic.MIN_LOGSCALE)

    def forward(self, x, context=None):
        a, b = x
        p = self._params(a, context)
        if self.transform == "additive":
            return (a, b + p[..., 0]), zero_logdet(b)
        s, t = torch.tanh(p[..., 0]), p[..., 1]
        if self.transform == "affine":
            return (a, b * torch.exp(s) + t), sum_per_sample(s)
        if self.training and torch.is_grad_enabled():  # recompute in the backward pass: saves memory
            g, log_slope = checkpoint(self._logit_cdf, b, p, use_reentrant=False)
        else:
            g, log_slope = self._logit_cdf(b, p)
        return (a, g * torch.exp(s) + t), sum_per_sample(log_slope + s)

    def _logit_cdf(self, b: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        return mixlogistic.logit_cdf(b, *self._mixture(p))

    def inverse(self, y, context=None):
        a, b = y
        p = self._params(a, context)
        if self.transform == "additive":
            return (a, b - p[..., 0])
        s, t = torch.tanh(p[..., 0]), p[..., 1]
        h = (b - t) * torch.exp(-s)
        if self.transform == "affine":
            return (a, h)
        x, self.last_inverse_iterations = mixlogistic.inverse_logit_cdf(h, *self._mixture(p))
        return (a, x)
