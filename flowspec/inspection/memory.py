"""Estimated memory of a training step at the spec's batch size: parameter state plus activations.

Without running the model (`inspect`), activations are estimated from the layers' output sizes; the
probe (`inspect --probe`) measures the tensors autograd keeps for backward on a real batch instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flowspec.inspection.flops import step_modules, step_spatial
from flowspec.inspection.report import Report
from flowspec.layers.networks import GatedAttention
from flowspec.spec import FlowSpec


@dataclass(frozen=True)
class MemoryEstimate:
    total: int
    state: int
    activations: int
    note: str


def fmt_bytes(n: int) -> str:
    """`12.0 GiB`, `35.1 MiB`, ..."""
    unit, scale = next(
        ((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if n >= s), ("B", 1)
    )
    return f"{n / scale:.1f} {unit}" if scale > 1 else f"{n} B"


def parameter_state(model: nn.Module, spec: FlowSpec) -> tuple[int, str]:
    """Bytes of weights, gradients, Adam's two moments and (with `ema`) the averaged weights."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    ema = spec.train.ema is not None
    return (4 + ema) * weights, "weights, gradients, Adam" + (", EMA" if ema else "")


def layer_outputs(module: nn.Module, height: int, width: int) -> int:
    """Elements per image output by the convolutions, dense layers, norms and attention of `module`."""
    positions = height * width
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            total += m.out_channels * positions
        elif isinstance(m, nn.Linear):
            total += m.out_features * positions
        elif isinstance(m, nn.LayerNorm):
            total += m.normalized_shape[-1] * positions
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            total += m.num_features * positions
        elif isinstance(m, GatedAttention):  # q, k, v and the output kept by fused attention
            total += 4 * m.proj1.in_features * positions
    return total


def estimate_memory(model: nn.Module, spec: FlowSpec, report: Report) -> MemoryEstimate:
    """Analytic estimate: parameter state + every layer output (float32) at the spec's batch size.

    Intermediate elementwise results are not counted, so this is a lower bound on the activations.
    """
    state, parts = parameter_state(model, spec)
    modules = step_modules(model)
    itemsize = next(model.parameters()).element_size()
    per_image = 0
    for row in report.rows():
        if not row.children and row.path in modules:
            h, w = step_spatial(row)
            per_image += sum(layer_outputs(m, h, w) for m in modules[row.path]) * itemsize
    activations = per_image * spec.train.batch
    note = (
        f"{fmt_bytes(state)} {parts} + {fmt_bytes(activations)} activations "
        "(layer outputs: a lower bound; --probe measures)"
    )
    return MemoryEstimate(state + activations, state, activations, note)


def measure_memory(model: nn.Module, spec: FlowSpec, images: torch.Tensor) -> MemoryEstimate:
    """Measured: the bytes autograd keeps for backward in a training-mode `log_prob` on `images`,
    parameters excluded, scaled to the spec's batch size."""
    state, parts = parameter_state(model, spec)
    params = {id(p) for p in model.parameters()}
    kept: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in params:
            kept[id(base)] = base  # holding the reference keeps the ids unique
        return t

    was_training = model.training
    model.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.log_prob(images)
    finally:
        model.train(was_training)
    saved = sum(t.numel() * t.element_size() for t in kept.values())
    activations = saved * spec.train.batch // len(images)
    note = (
        f"{fmt_bytes(state)} {parts} + {fmt_bytes(activations)} activations "
        f"(tensors kept for backward, measured at batch {len(images)} and scaled)"
    )
    return MemoryEstimate(state + activations, state, activations, note)
