"""Helpers for the layer and model tests (no tests here): float64 Jacobian checks, shrunk shipped specs."""

from __future__ import annotations

import torch
from conftest import ALL_SPECS, SPECS
from torch.autograd.functional import jacobian

from flowspec import load_spec
from flowspec.diagnostics import SpecError
from flowspec.spec import FlowSpec


def flat(state) -> torch.Tensor:
    """A state (tensor or pair) as one N x D tensor."""
    if isinstance(state, tuple):
        return torch.cat([s.flatten(1) for s in state], 1)
    return state.flatten(1)


def jacobian_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of fn at a single sample x (1 x ...), fn mapping tensors to states of equal dimension."""
    jac = jacobian(lambda t: flat(fn(t)), x, vectorize=True)
    d = x.numel()
    sign, logabsdet = torch.linalg.slogdet(jac.reshape(d, d))
    assert sign != 0
    return logabsdet


def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Add noise to every parameter, so no layer is an identity map and no gradient is trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


SHRINK = (
    "defaults.coupling.filters=8",
    "defaults.coupling.blocks=1",
    "defaults.coupling.components=3",
    "defaults.coupling.heads=2",
    "defaults.coupling.dropout=0",
)


def shipped_names() -> list[str]:
    return [str(p.relative_to(SPECS)) for p in ALL_SPECS]


def tiny_spec(name: str) -> FlowSpec:
    """The shipped spec `name` at C x S x S (its own channel count; S = 4, or the smallest power of two
    its squeezes and splits allow: 16 for three squeezes), with few filters and no dropout."""
    path = SPECS / name
    full = load_spec(path)
    extra = ("dequantize.context.filters=4",) if full.dequantize.kind == "variational" else ()
    for size in (4, 8, 16, 32):
        overrides = (f"data.shape={full.data.shape[0]}x{size}x{size}", *SHRINK, *extra)
        try:
            return load_spec(path, overrides=overrides)
        except SpecError:
            continue
    raise AssertionError(f"{name} does not shrink to 32x32")
