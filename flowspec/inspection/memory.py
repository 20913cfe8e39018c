"""Estimated memory of a training step at the spec's batch size: parameter state plus activations.

Without running the model (`inspect`), the activations are counted per layer: the tensors autograd keeps
for backward, given how each layer computes (and what it recomputes in the backward pass). The probe
(`inspect --probe`) measures instead what a training-mode pass on a real batch still holds when it returns.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from flowspec.inspection.flops import leaf_modules
from flowspec.inspection.report import Report
from flowspec.layers.dropout import Dropout
from flowspec.layers.networks import FlowppBlock, FlowppNetwork, GatedAttention, GatedConv
from flowspec.spec import FlowSpec
from flowspec.units import fmt_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    """The bytes at a training step's peak: the parameter state and the activations kept, and how."""

    total: int
    state: int
    activations: int
    note: str
    largest_step: int = 0  # bytes per image the largest step keeps: bounds what inference holds at once
    recomputes: bool = False  # the model has layers that --recompute changes (Flow++ blocks)


def parameter_state(model: nn.Module, spec: FlowSpec) -> tuple[int, int, str]:
    """Bytes of weights, gradients, Adam's two moments and (with `ema`) the averaged weights; the bytes
    of the weights; what the first counts."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    ema = spec.train.ema is not None
    return (4 + ema) * weights, weights, "weights, gradients, Adam" + (", EMA" if ema else "")


def _mask_bytes(dropout: Dropout, elements: int) -> int:
    """A dropout mask is kept as uint8 0s and 1s, 1 byte per element, when dropout is on."""
    return elements if dropout.p > 0 else 0


def _gated_conv(g: GatedConv, itemsize: int) -> int:
    """Bytes per position a stand-alone gated conv keeps for backward: its input, c1, the dropout mask,
    c2 and the gate's sigmoid (each layer keeps concat_elu's input, not its output: `project_concat_elu`),
    plus the context the context projection reads."""
    f = g.c1.out_channels
    kept = (1 + 1 + 2 + 1) * f * itemsize + _mask_bytes(g.dropout, 2 * f)
    if g.a_proj is not None:
        kept += g.a_proj.in_features // 2 * itemsize
    return kept


def _flowpp_block(block: FlowppBlock, itemsize: int) -> int:
    """Bytes per position a Flow++ block keeps in a training step (selective recomputation): its input,
    c1's output, c2's output when it is a 3x3 conv (`nin=off`; a 1x1 one is a dense layer, recomputed),
    its dropout masks and, with attention, the attention output and its per-head log-sum-exp."""
    f = block.conv.c1.out_channels
    kept = 2 * f * itemsize + _mask_bytes(block.conv.dropout, 2 * f)
    if isinstance(block.conv.c2, nn.Conv2d):
        kept += block.conv.c2.out_channels * itemsize
    if block.attn is not None:
        kept += _mask_bytes(block.attn.dropout, f)
    if isinstance(block.attn, GatedAttention):
        kept += (f + block.attn.heads) * itemsize
    return kept


def kept_per_position(module: nn.Module, itemsize: int) -> int:
    """Bytes per image and feature-map position that `module` allocates in a training step and autograd
    keeps for backward (each kept tensor is counted once, in the layer that made it).

    Flow++ networks keep only their ends and, per block, its input, dropout masks and the outputs of its
    convolutions and attention (the rest is recomputed in the backward pass); other modules count their
    convolution, dense and batch-norm outputs. (Each step kind's memory rule counts its own layer.)
    """
    if isinstance(module, FlowppNetwork):
        ends = module.proj_out.in_channels // (2 if module.final_elu else 1) + module.proj_out.out_channels
        return ends * itemsize + sum(_flowpp_block(b, itemsize) for b in module.blocks)
    if isinstance(module, FlowppBlock):
        return _flowpp_block(module, itemsize)
    if isinstance(module, GatedConv):
        return _gated_conv(module, itemsize)
    kept = 0
    if isinstance(module, nn.Conv2d):
        kept += module.out_channels * itemsize
    elif isinstance(module, nn.Linear):
        kept += module.out_features * itemsize
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        kept += module.num_features * itemsize
    return kept + sum(kept_per_position(child, itemsize) for child in module.children())


#: a training step's peak per image over the estimated kept activations (float32, recomputing) for models
#: with Flow++ blocks, by (recompute, precision): the backward pass's own buffers (gradients, a recomputed
#: block's activations) come on top of what the forward kept. Peak resident per image, measured on
#: flowpp_cifar at batches 2-16: 1.77-1.9, 4.2-4.55, 0.75-0.9 and 1.6-2.2 (bench/RESULTS.md)
PEAK_PER_KEPT = {(True, "fp32"): 2.15, (False, "fp32"): 4.7, (True, "bf16"): 0.9, (False, "bf16"): 2.4}
#: the same for other models (no layer recomputes): realnvp_cifar 1.09-1.17, seed_realnvp_cifar 1.43-1.54
PEAK_PER_KEPT_PLAIN = 1.45
RUNTIME = 192 * 2**20  # what the first training step adds besides tensors (kernels' workspaces, threads)
STEP_TEMPORARIES = 1.3  # copies of the weights the optimizer step allocates (EMA update, clipping, Adam)


def peak_factor(recomputes: bool, recompute: bool = True, precision: str = "fp32") -> float:
    """A training step's peak per image over its estimated kept activations (`recomputes`: the model has
    layers that --recompute changes)."""
    return PEAK_PER_KEPT[recompute, precision] if recomputes else PEAK_PER_KEPT_PLAIN


def training_peak(
    state: int, weights: int, kept: int, recomputes: bool, recompute: bool = True, precision: str = "fp32"
) -> int:
    """Bytes at a training step's peak: the parameter `state`, the runtime, in bf16 the copies of the
    `weights` and of their gradients that autocast makes (one more copy of the weights in all), and the
    larger of the backward pass's peak (`kept` activations times `peak_factor`) and the optimizer step's
    temporaries (measured: 1.25 copies of the weights, on imagenet32 at batch 1)."""
    copies = weights if precision == "bf16" else 0
    backward = round(peak_factor(recomputes, recompute, precision) * kept)
    return state + RUNTIME + copies + max(backward, round(STEP_TEMPORARIES * weights))


def estimate_memory(model: nn.Module, spec: FlowSpec, report: Report) -> MemoryEstimate:
    """Analytic estimate of a training step's peak memory at the spec's batch size (its micro-batch, with
    `accumulate`), recomputing in float32: `training_peak` of the parameter state and the activations
    autograd keeps for backward (each step kind's memory rule at its feature-map size; `kept_per_position`
    for the parts that are not steps)."""
    state, weights, parts = parameter_state(model, spec)
    itemsize = next(model.parameters(), torch.empty(0)).element_size()
    per_image = largest = 0
    for _, kind, module, shape, halves in leaf_modules(model, report):
        if kind is not None:
            step = kind.memory(module, shape, halves, itemsize)
        else:
            step = kept_per_position(module, itemsize) * shape[1] * shape[2]
        per_image, largest = per_image + step, max(largest, step)
    activations = per_image * spec.train.micro_batch
    recomputes = any(isinstance(m, FlowppBlock) for m in model.modules())
    return _estimate(state, weights, parts, activations, recomputes, "counted per layer", largest)


def peak_terms(
    state: int,
    weights: int,
    kept: int,
    recomputes: bool,
    recompute: bool = True,
    precision: str = "fp32",
    parts: str = "weights, gradients, Adam",
    how: str = "counted per layer",
) -> str:
    """What `training_peak` adds up, in words: the parameter state (`parts`), the larger of the backward
    pass's peak and the optimizer step's temporaries, the runtime and, in bf16, the weights' copy."""
    factor = peak_factor(recomputes, recompute, precision)
    backward, step = round(factor * kept), round(STEP_TEMPORARIES * weights)
    if backward >= step:
        peak = (
            f"{fmt_bytes(kept)} activations kept for backward ({how}) x{factor:g} at the backward pass's peak"
        )
    else:
        peak = f"{fmt_bytes(step)} of the optimizer step's temporaries ({STEP_TEMPORARIES:g} x the weights)"
    copies = f" + {fmt_bytes(weights)} bf16 copy of the weights" if precision == "bf16" else ""
    return f"{fmt_bytes(state)} {parts} + {peak} + {fmt_bytes(RUNTIME)} runtime{copies}"


def _estimate(
    state: int, weights: int, parts: str, kept: int, recomputes: bool, how: str, largest: int = 0
) -> MemoryEstimate:
    """The estimate of a training step's peak from its parameter state and `kept` activations, with its
    note (`how`: how the kept activations were found)."""
    total = training_peak(state, weights, kept, recomputes)
    terms = peak_terms(state, weights, kept, recomputes, parts=parts, how=how)
    how_run = "with --recompute on" if recomputes else "(no layer to recompute)"
    note = f"peak of a training step {how_run}: {terms}"
    if recomputes:
        fp32, bf16 = (training_peak(state, weights, kept, True, False, p) for p in ("fp32", "bf16"))
        note += (
            f"; ~{fmt_bytes(fp32)} with --recompute off (~{fmt_bytes(bf16)} in bf16), which auto picks where "
            "that fits"
        )
    return MemoryEstimate(total, state, kept, note, largest, recomputes)


def _held_bytes(model: nn.Module, images: torch.Tensor) -> int:
    """Bytes a training-mode `log_prob` on `images` allocates and still holds when it returns, less its
    output: what autograd keeps for backward, however it is kept (saved tensors, checkpoint caches)."""
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        log_prob = model.log_prob(images)
    with quiet_stderr():
        held = sum(event.self_cpu_memory_usage for event in prof.events())
    return held - log_prob.numel() * log_prob.element_size()


def measure_memory(model: nn.Module, spec: FlowSpec, images: torch.Tensor) -> MemoryEstimate:
    """Measured: the bytes per image that a training-mode `log_prob` keeps for backward, from two
    batches (half of `images` and all of it; `images` twice for one image), so that tensors whose size
    does not grow with the batch (clamped weights, decompositions) cancel; scaled to the spec's batch (its
    micro-batch, with `accumulate`)."""
    state, weights, parts = parameter_state(model, spec)
    small = images[: max(1, len(images) // 2)]
    large = images if len(images) > 1 else torch.cat([images, images])
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            per_image = (_held_bytes(model, large) - _held_bytes(model, small)) / (len(large) - len(small))
    finally:
        model.train(was_training)
    kept = round(per_image * spec.train.micro_batch)
    recomputes = any(isinstance(m, FlowppBlock) for m in model.modules())
    how = f"measured per image at batch {len(large)} and scaled"
    return _estimate(state, weights, parts, kept, recomputes, how)


@contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's C++ library logs its start and stop there."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
