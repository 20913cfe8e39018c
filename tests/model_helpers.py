"""Helpers for the layer and model tests (no tests here): float64 Jacobian checks, shrunk shipped specs."""

from __future__ import annotations

import torch
from conftest import ALL_SPECS, SPECS
from torch.autograd.functional import jacobian

from flowspec import load_spec, parse_spec
from flowspec.diagnostics import SpecError
from flowspec.layers import DataInit
from flowspec.spec import FlowSpec


def flat(state) -> torch.Tensor:
    """A state (tensor or pair) as one N x D tensor."""
    if isinstance(state, tuple):
        return torch.cat([s.flatten(1) for s in state], 1)
    return state.flatten(1)


def independent_samples(model: torch.nn.Module) -> bool:
    """Whether `model` maps each sample of a batch on its own: every module in eval mode (no batch
    statistics, no dropout) and every data-dependent layer initialised (none initialises on this batch)."""
    return all(not m.training for m in model.modules()) and all(
        bool(m.initialized) and not m.init_mode for m in model.modules() if isinstance(m, DataInit)
    )


def jacobian_logdet(
    fn, x: torch.Tensor, chunk: int = 256, model: torch.nn.Module | None = None
) -> torch.Tensor:
    """log|det J| of fn at a single sample x (1 x ...), fn mapping tensors to states of equal dimension.

    When `model` (which fn runs) maps samples independently (`independent_samples`), J comes from one
    forward and one backward pass of a batch of d copies of x: row i is the gradient of output i of copy i
    (exact; several times faster than batched backward passes through a big model). Otherwise rows come
    from batched backward passes, `chunk` rows at a time (bounded memory for big inputs)."""
    d = x.numel()
    if model is not None and independent_samples(model):
        copies = x.detach().expand(d, *x.shape[1:]).clone().requires_grad_(True)
        y = flat(fn(copies))
        assert y.shape == (d, d)
        jac = torch.autograd.grad(y, copies, torch.eye(d, dtype=y.dtype))[0].reshape(d, d)
    elif d <= chunk:
        jac = jacobian(lambda t: flat(fn(t)), x, vectorize=True).reshape(d, d)
    else:
        x = x.detach().requires_grad_(True)
        y = flat(fn(x)).reshape(d)
        eye = torch.eye(d, dtype=y.dtype)
        rows = [
            torch.autograd.grad(y, x, eye[i : i + chunk], retain_graph=True, is_grads_batched=True)[0]
            for i in range(0, d, chunk)
        ]
        jac = torch.cat(rows).reshape(d, d)
    sign, logabsdet = torch.linalg.slogdet(jac)
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


#: shrunk, these need inputs too big for whole-model Jacobians in seconds: celeba128_5bit's four
#: squeezes need 3x16x32 (1536 dimensions, minutes per Jacobian). Its layers and options are those of
#: the 64x64 models, checked here; tests/test_official.py checks its inverse and trains it.
TOO_BIG = ("celeba128_5bit.flow",)


def distinct_models() -> list[str]:
    """The shipped specs, leaving out those whose model is an earlier one's (e.g. the same network on
    other data: ImageNet 64 and CelebA 64 at 5 and 3 bits) and those in `TOO_BIG`."""
    seen, out = set(TOO_BIG), []
    for name in shipped_names():
        spec = load_spec(SPECS / name)
        key = repr([spec.data.shape, spec.preprocess, spec.defaults, spec.dequantize, spec.flow])
        if key not in seen and name not in seen:
            seen.add(key)
            out.append(name)
    return out


TINY_SIZES = ((4, 4), (8, 8), (8, 16), (16, 16), (16, 32), (32, 32))


def tiny_spec(name: str) -> FlowSpec:
    """The shipped spec `name` at C x 4 x 4 (its own channel count), or the smallest size its squeezes
    and splits allow (8 x 16 for three squeezes), with few filters and no dropout."""
    path = SPECS / name
    full = load_spec(path)
    extra = ("dequantize.context.filters=4",) if full.dequantize.kind == "variational" else ()
    for h, w in TINY_SIZES:
        overrides = (f"data.shape={full.data.shape[0]}x{h}x{w}", *SHRINK, *extra)
        try:
            return load_spec(path, overrides=overrides)
        except SpecError:
            continue
    raise AssertionError(f"{name} does not shrink to 32x32")


def variational_spec(context: str, mask: str = "checkerboard", dropout: float = 0.0) -> FlowSpec:
    """A tiny 1 x 8 x 8 flow whose variational dequantizer splits by `mask`, with `context` settings and
    couplings of that `dropout`."""
    coupling = f"coupling(filters=4, blocks=1, heads=2, components=2, dropout={dropout})"
    return parse_spec(
        f"""model t
data digits {{ shape 1x8x8  levels 17 }}
preprocess logit(alpha=0.05)
dequantize variational {{
  context({context})
  split {mask} {{ {coupling}; flip; {coupling} }}
  sigmoid
}}
flow {{ split checkerboard {{ {coupling} }} }}
prior normal
"""
    )
