"""Compile a validated `FlowSpec` into a `FlowModel`: unroll repeats, build each step from the registry."""

from __future__ import annotations

from typing import Any

from flowspec.layers import FactorOut, LogitPreprocess, Sequence, UniformDequantizer, VariationalDequantizer
from flowspec.layers.base import Layer
from flowspec.layers.networks import ContextNetwork
from flowspec.model import FlowModel
from flowspec.registry import FACTORIES, BuildContext, State
from flowspec.spec import FlowSpec


def _stack_builder(ctx: BuildContext):
    def build_stack(steps: list[Any], state: State, prefix: str) -> tuple[list[Layer], State]:
        """Layers of a step list (repeats unrolled, each copy with its own parameters), final state."""
        out: list[Layer] = []
        for i, step in enumerate(steps):
            path = f"{prefix}.{i}"
            if step.kind == "repeat":
                for r in range(step.count):
                    body, state = build_stack(step.body, state, f"{path}.body")
                    for layer in body:
                        for m in layer.modules():
                            if isinstance(m, Layer) and m.spec_path and m.repeat_index is None:
                                m.repeat_index = r
                    out += body
                continue
            layer, state = FACTORIES[step.kind](step, state, path, ctx)
            layer.spec_path = path
            out.append(layer)
        return out, state

    return build_stack


def _main_flow(spec: FlowSpec) -> Sequence:
    ctx = BuildContext(build_stack=lambda *a: ([], a[1]))
    ctx.build_stack = _stack_builder(ctx)
    layers, final = ctx.build_stack(spec.flow, spec.data.shape, "flow")
    flow = Sequence(layers, latent_shape=spec.data.shape)
    flow.set_factored([m.factored_shape for m in layers if isinstance(m, FactorOut)], final)
    return flow


def _dequantizer(spec: FlowSpec):
    deq = spec.dequantize
    if deq.kind == "uniform":
        return UniformDequantizer()
    masks = [s.mask for s in _all_steps(deq.steps) if s.kind == "split"] or ["stripe"]
    c = spec.data.shape[0]
    dropout = max((s.dropout for s in _all_steps(deq.steps) if s.kind == "coupling"), default=0.0)
    context = ContextNetwork(c, deq.context.filters, deq.context.blocks, masks[0], spec.data.levels, dropout)
    context.spec_path = "dequantize.context"
    ctx = BuildContext(build_stack=lambda *a: ([], a[1]), context_filters=deq.context.filters)
    ctx.build_stack = _stack_builder(ctx)
    layers, _ = ctx.build_stack(deq.steps, spec.data.shape, "dequantize")
    return VariationalDequantizer(context, Sequence(layers))


def _all_steps(steps):
    for step in steps:
        yield step
        if step.kind in ("split", "repeat"):
            yield from _all_steps(step.body)


def build(spec: FlowSpec) -> FlowModel:
    """Compile `spec` into a `FlowModel` (float32, on the CPU, not yet data-initialised)."""
    preprocess = LogitPreprocess(spec.preprocess.alpha, spec.data.levels)
    preprocess.spec_path = "preprocess"
    return FlowModel(spec, preprocess, _dequantizer(spec), _main_flow(spec))
