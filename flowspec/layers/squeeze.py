"""Space-to-depth 2 x 2 with TensorFlow's channel order (the official Flow++ code runs channels-last)."""

from __future__ import annotations

from torch import Tensor

from flowspec.layers.base import Layer, State, zero_logdet


def squeeze(x: Tensor) -> Tensor:
    """N x C x H x W -> N x 4C x H/2 x W/2; new channel (2 dy + dx) C + c holds pixel offset (dy, dx)."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(n, 4 * c, h // 2, w // 2)


def unsqueeze(y: Tensor) -> Tensor:
    """The inverse of `squeeze`."""
    n, c4, h, w = y.shape
    c = c4 // 4
    y = y.view(n, 2, 2, c, h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c, 2 * h, 2 * w)


class Squeeze(Layer):
    """The `squeeze` step: space-to-depth 2 x 2, volume-preserving (log-det 0)."""

    def forward(self, x: State, context: Tensor | None = None) -> tuple[State, Tensor]:
        return squeeze(x), zero_logdet(x)

    def inverse(self, y: State, context: Tensor | None = None) -> State:
        return unsqueeze(y)
