"""The layer protocol, composition of layers, and data-dependent initialisation."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Union

import torch
from torch import Tensor, nn

State = Union[Tensor, tuple[Tensor, Tensor]]


def first(x: State) -> Tensor:
    """The tensor of a state, or the first half of a pair."""
    return x[0] if isinstance(x, tuple) else x


def logdet_dtype(x: Tensor) -> torch.dtype:
    """Log-dets accumulate in float32, or float64 for float64 data."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def zero_logdet(x: State) -> Tensor:
    """A per-sample zero log-det matching the batch of `x`."""
    t = first(x)
    return torch.zeros(t.shape[0], dtype=logdet_dtype(t), device=t.device)


def sum_per_sample(x: Tensor) -> Tensor:
    """Sum over every dimension but the batch, in the log-det dtype."""
    return x.flatten(1).sum(1, dtype=logdet_dtype(x))


def autocast(x: Tensor, dtype: torch.dtype | None) -> AbstractContextManager:
    """torch.autocast to `dtype` on x's device, or nothing when dtype is None."""
    return nullcontext() if dtype is None else torch.autocast(x.device.type, dtype=dtype)


def nats_per_bpd(dims: int) -> float:
    """One bit per dimension of an image of `dims` values, in nats per image: D ln 2."""
    return dims * math.log(2.0)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I), summed per sample."""
    return sum_per_sample(-0.5 * z.square()) - 0.5 * math.log(2 * math.pi) * z[0].numel()


class Layer(nn.Module):
    """A bijection. `spec_path` names the spec step it was built from; `repeat_index` the repetition."""

    spec_path: str = ""
    repeat_index: int | None = None
    factors_out = False  # True for a layer returning (kept, factored) to its sequence

    def forward(self, x: State, context: Tensor | None = None) -> tuple[State, Tensor]:
        raise NotImplementedError

    def inverse(self, y: State, context: Tensor | None = None) -> State:
        raise NotImplementedError


class DataInit:
    """Mixin for a module with data-dependent initialisation, done on its first forward in init mode.

    The `initialized` flag is a buffer, so it is saved with the weights: a loaded model never
    re-initialises. `FlowModel.initialize` switches init mode on and off.
    """

    init_mode = False

    def register_init_flag(self) -> None:
        self.register_buffer("initialized", torch.tensor(False))  # type: ignore[attr-defined]

    def needs_init(self) -> bool:
        return self.init_mode and not bool(self.initialized)

    def mark_initialized(self) -> None:
        self.initialized.fill_(True)


class Sequence(Layer):
    """Layers applied in order, log-dets summed; each is called through `__call__`, so forward hooks fire.

    A `FactorOut` layer returns `(kept, factored)`: the sequence keeps going with `kept`. With a
    `latent_shape` (the main flow), the factored parts and the final tensor are flattened, concatenated
    in that order and viewed as one latent of the image's shape.
    """

    def __init__(self, layers: list[Layer], latent_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.latent_shape = latent_shape
        self.factored_shapes: list[tuple[int, ...]] = []

    def forward(self, x: State, context: Tensor | None = None) -> tuple[State, Tensor]:
        logdet = zero_logdet(x)
        parts: list[Tensor] = []
        for layer in self.layers:
            x, ld = layer(x, context)
            logdet = logdet + ld
            if layer.factors_out:
                x, factored = x
                parts.append(factored)
        if self.latent_shape is not None:
            assert isinstance(x, Tensor)
            flat = torch.cat([p.flatten(1) for p in parts] + [x.flatten(1)], 1) if parts else x
            x = flat.reshape(flat.shape[0], *self.latent_shape)
        return x, logdet

    def inverse(self, y: State, context: Tensor | None = None) -> State:
        parts: list[Tensor] = []
        if self.latent_shape is not None:
            assert isinstance(y, Tensor)
            flat = y.flatten(1)
            sizes = [math.prod(s) for s in self.factored_shapes]
            pieces = list(flat.split([*sizes, flat.shape[1] - sum(sizes)], 1))
            parts = [p.view(p.shape[0], *s) for p, s in zip(pieces[:-1], self.factored_shapes, strict=True)]
            y = pieces[-1].reshape(flat.shape[0], *self.final_shape)
        for layer in reversed(self.layers):
            if layer.factors_out:
                y = (y, parts.pop())
            y = layer.inverse(y, context)
        return y

    def set_factored(self, factored_shapes: list[tuple[int, ...]], final_shape: tuple[int, ...]) -> None:
        """Shapes of the factored-out parts (in order) and of the last tensor, for the inverse."""
        self.factored_shapes = list(factored_shapes)
        self.final_shape = final_shape
