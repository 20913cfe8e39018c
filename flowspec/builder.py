"""Compile a validated `FlowSpec` into a `FlowModel`: one layer per run of the unrolled walk, each made
by its step kind's build rule."""

from __future__ import annotations

import contextlib

import torch

from flowspec.layers import FactorOut, LogitPreprocess, Sequence, UniformDequantizer, VariationalDequantizer
from flowspec.layers.base import Layer
from flowspec.layers.networks import ContextNetwork
from flowspec.model import FlowModel
from flowspec.shapes import check_shapes
from flowspec.spec import FlowSpec, context_mask
from flowspec.steps import BuildContext, State, StepRun, walk, written
from flowspec.steps.coupling import CouplingStep


def _layers(runs: list[StepRun], ctx: BuildContext) -> list[Layer]:
    """Layers of the runs (repeats unrolled, each copy with its own parameters), tagged with their paths."""
    out: list[Layer] = []
    for run in runs:
        made = run.kind.build(run, ctx, _layers(run.body, ctx))
        if isinstance(made, list):
            out += made
            continue
        made.spec_path, made.repeat_index = run.path, run.copy
        out.append(made)
    return out


def _stack(steps: list, shape: State, where: str, ctx: BuildContext) -> tuple[list[Layer], State]:
    stack = walk(steps, shape, where, unroll=True)  # no issues: `build` checked the shapes
    return _layers(stack.runs, ctx), stack.final


def _main_flow(spec: FlowSpec) -> Sequence:
    layers, final = _stack(spec.flow, spec.data.shape, "flow", BuildContext())
    flow = Sequence(layers, latent_shape=spec.data.shape)
    flow.set_factored([m.factored_shape for m in layers if isinstance(m, FactorOut)], final)
    return flow


def _dequantizer(spec: FlowSpec):
    deq = spec.dequantize
    if deq.kind == "uniform":
        return UniformDequantizer()
    steps = [step for _, step in written(deq.steps)]
    c = spec.data.shape[0]
    dropout = max((s.dropout for s in steps if isinstance(s, CouplingStep)), default=0.0)
    cfg = deq.context
    context = ContextNetwork(
        c,
        cfg.filters,
        cfg.blocks,
        context_mask(deq),
        spec.data.levels,
        dropout,
        layernorm=cfg.layernorm,
        attention=cfg.attention,
        heads=cfg.heads,
        weight_norm=cfg.weight_norm,
        image_size=spec.data.shape[1:],
    )
    context.spec_path = "dequantize.context"
    layers, _ = _stack(deq.steps, spec.data.shape, "dequantize", BuildContext(deq.context.filters))
    return VariationalDequantizer(context, Sequence(layers))


def build(spec: FlowSpec, device: torch.device | str | None = None) -> FlowModel:
    """Compile `spec` into a `FlowModel` (float32, not yet data-initialised) on `device` (default: the
    CPU). On the meta device nothing is allocated or drawn: counting a 169M-parameter spec takes seconds.

    Raises `ShapeError` when a step cannot run on its input (a spec made in Python, not loaded)."""
    check_shapes(spec)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        preprocess = LogitPreprocess(spec.preprocess.alpha, spec.data.levels)
        preprocess.spec_path = "preprocess"
        return FlowModel(spec, preprocess, _dequantizer(spec), _main_flow(spec))
