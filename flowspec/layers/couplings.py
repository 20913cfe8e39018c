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
from flowspec.layers.base import Layer, State, autocast, sum_per_sample, zero_logdet


def outputs_per_element(transform: str, components: int) -> int:
    """Values the coupling network gives each transformed element: a shift (additive), a scale and shift
    (affine), or a scale, shift and `components` logistics' weights, means and scales (mixlogistic)."""
    return {"additive": 1, "affine": 2, "mixlogistic": 2 + 3 * components}[transform]


class Coupling(Layer):
    """`forward((a, b)) -> ((a, T(b; net(a))), log|det dT/db|)`.

    `autocast_dtype` runs the network under torch.autocast; the transform and its log-det stay in the
    data's dtype (float32 or float64).
    """

    def __init__(self, transform: str, network: nn.Module, components: int):
        super().__init__()
        self.transform = transform
        self.network = network
        self.per_element = outputs_per_element(transform, components)
        self.autocast_dtype: torch.dtype | None = None
        self.fused: str | None = None  # the torch.compile backend of the mixture's logit-CDF (`Fusable`)

    def _params(self, a: Tensor, context: Tensor | None) -> Tensor:
        """Network outputs as N x C x H x W x P, in a's dtype."""
        with autocast(a, self.autocast_dtype):
            out = self.network(a, context)
        return out.unflatten(1, (a.shape[1], self.per_element)).permute(0, 1, 3, 4, 2).to(a.dtype)

    def _split(self, p: Tensor) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...]]:
        """The shift t, the scale's tanh(s) (None if additive) and the mixture's logits, means and
        log-scales, from the network outputs (one `split`: its backward is a single cat)."""
        if self.transform == "additive":
            return p[..., 0], None, ()
        k = (self.per_element - 2) // 3
        s, t, *mixture = p.split([1, 1] if self.transform == "affine" else [1, 1, k, k, k], -1)
        return t.squeeze(-1), torch.tanh(s.squeeze(-1)), tuple(mixture)

    def forward(self, x: State, context: Tensor | None = None) -> tuple[State, Tensor]:
        a, b = x
        t, s, mixture = self._split(self._params(a, context))
        if s is None:
            return (a, b + t), zero_logdet(b)
        if not mixture:
            return (a, b * torch.exp(s) + t), sum_per_sample(s)
        if self.training and torch.is_grad_enabled():  # recompute in the backward pass: saves memory
            g, log_slope = checkpoint(
                mixlogistic.logit_cdf, b, *mixture, fused=self.fused, use_reentrant=False
            )
        else:
            g, log_slope = mixlogistic.logit_cdf(b, *mixture, fused=self.fused)
        return (a, g * torch.exp(s) + t), sum_per_sample(log_slope + s)

    def inverse(self, y: State, context: Tensor | None = None) -> State:
        a, b = y
        t, s, mixture = self._split(self._params(a, context))
        if s is None:
            return (a, b - t)
        h = (b - t) * torch.exp(-s)
        if not mixture:
            return (a, h)
        x, _ = mixlogistic.inverse_logit_cdf(h, *mixture, fused=self.fused)
        return (a, x)
