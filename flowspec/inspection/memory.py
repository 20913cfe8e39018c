"""Estimated memory of a training step at the spec's batch size: parameter state plus activations.

Without running the model (`inspect`), the activations are counted per layer: the tensors autograd keeps
for backward, given how each layer computes (and what it recomputes in the backward pass). The probe
(`inspect --probe`) measures those tensors on a real batch instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flowspec.inspection.flops import step_modules, step_spatial
from flowspec.inspection.report import Report
from flowspec.layers.couplings import Coupling
from flowspec.layers.networks import FlowppNetwork, GatedConv
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


def _gated_conv(g: GatedConv, itemsize: int) -> int:
    """Bytes per position a gated conv keeps for backward: its input, the concat_elu output, c1, the
    dropout mask (float) and output, c2 and the gate's sigmoid (in a Flow++ block: LayerNorm's output,
    which the recomputed attention keeps as its input), plus the context projection's input."""
    f = g.c1.out_channels
    kept = (1 + 2 + 1 + 2 * (g.dropout.p > 0) + 2 + 2 + 1) * f
    if g.a_proj is not None:
        kept += g.a_proj.in_features
    return kept * itemsize


def kept_per_position(module: nn.Module, itemsize: int) -> int:
    """Bytes per image and feature-map position that autograd keeps for backward in a training step.

    Flow++ blocks recompute gate + LayerNorm and the attention in the backward pass (torch.utils.checkpoint)
    and keep only their inputs; the mixture couplings recompute the logit-CDF and keep b, tanh(s), exp(s)
    and its output. Other layers count their convolution, dense and batch-norm outputs.
    """
    if isinstance(module, FlowppNetwork):
        blocks = list(module.blocks)
        a_proj = blocks[0].conv.a_proj if blocks else None
        context = a_proj.in_features // 2 if a_proj is not None else 0  # kept by its concat_elu
        ends = module.proj_in.in_channels + module.proj_out.in_channels + module.proj_out.out_channels
        return (ends + context) * itemsize + sum(_gated_conv(b.conv, itemsize) for b in blocks)
    if isinstance(module, GatedConv):
        return _gated_conv(module, itemsize)
    kept = 0
    if isinstance(module, Coupling) and isinstance(module.network, FlowppNetwork):
        channels = module.network.proj_out.out_channels // module.per_element
        kept += {"additive": 0, "affine": 3, "mixlogistic": 4}[module.transform] * channels * itemsize
    elif isinstance(module, nn.Conv2d):
        kept += module.out_channels * itemsize
    elif isinstance(module, nn.Linear):
        kept += module.out_features * itemsize
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        kept += module.num_features * itemsize
    return kept + sum(kept_per_position(child, itemsize) for child in module.children())


def estimate_memory(model: nn.Module, spec: FlowSpec, report: Report) -> MemoryEstimate:
    """Analytic estimate of a training step's memory at the spec's batch size: the parameter state plus
    the activations autograd keeps for backward (`kept_per_position` of every step at its feature-map
    size). The backward pass's own buffers (recomputed blocks, gradients) add a few percent at the peak."""
    state, parts = parameter_state(model, spec)
    modules = step_modules(model)
    itemsize = next(model.parameters()).element_size()
    per_image = 0
    for row in report.rows():
        if not row.children and row.path in modules:
            h, w = step_spatial(row)
            per_image += sum(kept_per_position(m, itemsize) for m in modules[row.path]) * h * w
    activations = per_image * spec.train.batch
    note = (
        f"{fmt_bytes(state)} {parts} + {fmt_bytes(activations)} activations "
        "(tensors kept for backward, counted per layer; --probe measures them)"
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
