"""Refuse a model too large to build or train, before anything is allocated.

The spec is first counted (steps after repeats are unrolled), then built on torch's meta device, which
gives every parameter's shape and no storage: the parameter count and the training-memory estimate of
`memory.estimate_memory` come from it. What a command needs is compared with the memory of the device
it runs on (RAM, bounded by the address-space and cgroup limits of the process, or the GPU's memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from flowspec import devices
from flowspec.errors import UserError, job_number
from flowspec.inspection.memory import estimate_memory, peak_terms, training_peak
from flowspec.inspection.params import parameters_by_path
from flowspec.inspection.report import make_report
from flowspec.inspection.unroll import check_steps, stacks, unrolled_steps
from flowspec.spec import FlowSpec
from flowspec.units import fmt_bytes

ALLOW = "pass --allow-large to go ahead anyway"

Use = Literal["build", "infer", "train"]


@dataclass(frozen=True)
class Size:
    """What a spec builds: unrolled steps, trainable parameters, and the bytes a command needs."""

    steps: int
    parameters: int
    weights: int  # bytes of the trainable parameters
    train: int  # bytes at a training step's peak at the spec's batch, recomputing in float32
    state: int  # bytes of the weights, gradients, Adam's moments and the EMA
    per_image: int  # bytes per image a training step keeps for backward (float32, recomputing)
    largest_step: int  # bytes per image the largest step keeps (what inference holds at once, about)
    largest: str  # the step owning most parameters, with its settings and source
    recomputes: bool  # the model has layers that --recompute changes


def meta_model(spec: FlowSpec) -> torch.nn.Module:
    """The model `spec` builds, on the meta device: every tensor's shape, no storage (see `check_steps`)."""
    check_steps(spec)
    import flowspec

    with torch.device("meta"):
        return flowspec.build(spec)


def measure(spec: FlowSpec) -> Size:
    """Count and estimate `spec` without allocating it (see `meta_model`)."""
    model = meta_model(spec)
    report = make_report(spec, parameters_by_path(model))
    estimate = estimate_memory(model, spec, report)
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    leaves = [row for row in report.rows() if row.leaf]
    top = max(leaves, key=lambda row: row.params, default=None)
    largest = ""
    if top is not None and top.params:
        at = f" at {top.source}" if top.source else ""
        largest = f"; {top.params:,} of them in {top.path} ({top.kind} {top.settings}{at})"
    per_image = estimate.activations // spec.train.micro_batch
    return Size(
        sum(unrolled_steps(s) for s in stacks(spec).values()),
        parameters,
        4 * parameters,
        estimate.total,
        estimate.state,
        per_image,
        estimate.largest_step,
        largest,
        estimate.recomputes,
    )


def images_per_process(spec: FlowSpec, world: int = 1) -> int:
    """Images a training step holds at once in one of `world` processes: its share of the micro-batch."""
    return max(1, spec.train.micro_batch // world)


def training_bytes(
    size: Size, spec: FlowSpec, world: int = 1, recompute: bool = True, precision: str = "fp32"
) -> int:
    """The estimated peak of a training step of one of `world` processes, recomputing or not, in
    `precision` (`memory.training_peak`)."""
    kept = size.per_image * images_per_process(spec, world)
    return training_peak(size.state, size.weights, kept, size.recomputes, recompute, precision)


def _train_terms(size: Size, spec: FlowSpec, recompute: bool, precision: str) -> str:
    """What `training_bytes` adds up for one process, in words."""
    kept = size.per_image * images_per_process(spec, job_number("WORLD_SIZE", 1))
    return peak_terms(
        size.state, size.weights, kept, size.recomputes, recompute, precision, "parameter state"
    )


def check_size(
    spec: FlowSpec,
    use: Use,
    device: str | torch.device = "cpu",
    allow_large: bool = False,
    images: int = 0,
    recompute: bool = True,
    precision: str = "fp32",
) -> Size:
    """Refuse (a `UserError`) a spec whose `use` needs more memory than `device` has, before allocating.

    `build`: the weights and what a training-mode pass keeps for backward of `images` images (inspect
    --probe: its initialization batch); `infer`: the weights and what the largest step holds for `images`
    images at once (eval, sample); `train`: the estimated peak of a training step at the spec's batch (one
    torchrun process's share of it), recomputing or not (`recompute`) in `precision` (fp32, bf16), as the
    run will. `allow_large` skips the memory check (the limit on unrolled steps remains: building that many
    cannot end).
    """
    size = measure(spec)
    if use == "train" and size.parameters == 0:
        raise UserError(
            f"{spec.name} has no trainable parameters: its flow needs a coupling, norm or pointwise step"
        )
    need = {
        "build": size.weights + images * size.per_image,
        "infer": size.weights + images * size.largest_step,
        "train": training_bytes(size, spec, job_number("WORLD_SIZE", 1), recompute, precision),  # torchrun's
    }[use]
    have = devices.device_memory(device)
    if allow_large or need <= have:
        return size
    batch = f" and {images:,} images" if images else ""
    what = {
        "build": f"{fmt_bytes(need)} for its weights{batch}",
        "infer": f"{fmt_bytes(need)} for its weights{batch}",
        "train": f"an estimated {fmt_bytes(need)} at a training step's peak with --recompute "
        f"{'on' if recompute else 'off'} in {precision} ({_train_terms(size, spec, recompute, precision)}; "
        "per process)",
    }[use]
    if images and use != "train" and size.weights <= have:  # only the images at once need to change
        advice = "Take fewer images at once (--batch)"
    else:
        advice = (
            "Lower the settings that size it (defaults.coupling.filters, blocks, components, repeat counts, "
            "data.shape, train.batch)"
        )
    source = f" ({spec.source})" if spec.source else ""
    kind, processes = torch.device(device).type, devices.processes_on_this_machine()
    if kind == "cuda":
        memory = f"{kind} memory is {fmt_bytes(have)}"
    else:  # what the process may still take: its share, less what it holds (devices.device_memory)
        share = f" (its share: {processes} processes on this machine)" if processes > 1 else ""
        memory = f"this process can still take {fmt_bytes(have)} of cpu memory{share}"
    raise UserError(
        f"{spec.name}{source} is too large for this machine: {size.parameters:,} parameters{size.largest} "
        f"need {what}, and {memory}. {advice}, or {ALLOW}"
    )
