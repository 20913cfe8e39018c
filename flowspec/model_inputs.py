"""Checks of what a `FlowModel`'s public methods are given, so that a wrong batch fails with a message
naming the method and what it expected, instead of NaN, a silently wrong number or an error deep in torch.

Shapes and types are always checked. Values are checked only for tensors on the CPU: on a GPU reading
them back would wait for the device (the training loop feeds data that was checked when it was read).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Literal

import torch
from torch import Tensor

Kind = Literal["images", "data", "latents"]  # integer images, continuous data v, latents z
WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)  # torch has no min or max for these


def check_batch(x: object, method: str, shape: tuple[int, ...], levels: int, kind: Kind) -> Tensor:
    """`x` if it is a batch of `kind` of `shape` (N x C x H x W) for `method`; else a TypeError or
    ValueError saying what was expected. Integer images must hold whole numbers in [0, levels)."""
    if not isinstance(x, Tensor):
        hint = " (convert it with torch.from_numpy)" if type(x).__module__ == "numpy" else ""
        raise TypeError(f"{method} takes a torch.Tensor, got {type(x).__name__}{hint}")
    expected = " x ".join(map(str, shape))
    if x.ndim != 1 + len(shape) or tuple(x.shape[1:]) != shape or len(x) == 0:
        got = " x ".join(map(str, x.shape)) or "a scalar"
        raise ValueError(
            f"{method} takes a batch of {kind} N x {expected} (N >= 1, then the spec's data.shape, channels "
            f"first), got {got}"
        )
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{method} takes real-valued {kind}, got a {x.dtype} tensor")
    if kind != "images" or x.device.type != "cpu":
        return x
    if x.is_floating_point() and not torch.equal(x, x.floor()):  # also refuses NaN
        raise ValueError(
            f"{method} takes integer images (whole numbers 0 .. {levels - 1}), got values that are not whole "
            f"numbers; images scaled to [0, 1] must be scaled back: (x * {levels - 1}).round()"
        )
    values = x.double() if x.dtype in WIDE_UNSIGNED else x
    low, high = (v.item() for v in torch.aminmax(values))
    if low < 0 or high > levels - 1:
        raise ValueError(
            f"{method} takes integer images with values 0 .. {levels - 1} (the spec's data.levels is "
            f"{levels}), got values from {low:g} to {high:g}"
        )
    return x


def check_data(v: Tensor, y: Tensor, method: str, domain: tuple[float, float], levels: int) -> None:
    """A ValueError unless `y`, the logit preprocessing of the data `v`, is finite (v finite and inside
    the open interval `domain`, computed as the preprocessing computes); checked on the CPU only."""
    if v.device.type != "cpu" or bool(torch.isfinite(y).all()):
        return
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{method} takes finite data, got NaN or infinite values")
    low, high = (t.item() for t in torch.aminmax(v))
    raise ValueError(
        f"{method} takes continuous data v in the logit preprocessing's open interval ({domain[0]:g}, "
        f"{domain[1]:g}), where dequantized images x + u in [0, {levels}) lie (the spec's data.levels is "
        f"{levels}); got values from {low:g} to {high:g}"
    )


def sample_arguments(n: object, temperature: object) -> tuple[int, float]:
    """`n` and `temperature` as an int and a float (numpy scalars and one-element tensors too); a TypeError
    or ValueError unless `n` is a whole number >= 1 and `temperature` a finite number >= 0."""
    try:
        if isinstance(n, bool) or (isinstance(n, Tensor) and n.dtype == torch.bool):
            raise TypeError
        count = operator.index(n)
    except TypeError:
        raise TypeError(f"sample takes a whole number of images n, got {n!r}") from None
    if count < 1:
        raise ValueError(f"sample takes n >= 1 images, got {count}")
    scalar = isinstance(temperature, Tensor) and temperature.numel() == 1 and temperature.dtype != torch.bool
    if isinstance(temperature, bool) or not (isinstance(temperature, numbers.Real) or scalar):
        raise TypeError(f"sample takes a number as temperature, got {temperature!r}")
    value = float(temperature)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"sample takes a finite temperature >= 0, got {value}")
    return count, value


def check_autocast_dtype(dtype: object) -> None:
    """A ValueError unless `dtype` is None or a 16-bit floating type that autocast can run in."""
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"set_autocast takes torch.bfloat16, torch.float16 or None, got {dtype!r}")


def check_not_meta(device: torch.device, method: str) -> None:
    """A ValueError if the model is on the meta device, which has shapes but no values."""
    if device.type == "meta":
        raise ValueError(
            f"{method}: this model is on the meta device, which holds shapes but no weights (for counting "
            f"and inspecting only); build or load it on cpu or cuda to compute with it"
        )
