"""The one place that maps a spec step kind to the layer module it builds.

A factory takes the step, the state it receives (a shape C x H x W, or a pair of half shapes inside a
split) and the build context, and returns the layer and the state it produces. Adding a layer kind means
adding a factory here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

from torch import nn

from flowspec import layers as L
from flowspec.layers.couplings import outputs_per_element
from flowspec.layers.networks import FlowppNetwork, ResNet
from flowspec.shapes import half_shape

Shape = tuple[int, int, int]
State = Union[Shape, tuple[Shape, Shape]]


@dataclass
class BuildContext:
    """What factories need beyond the step: the stack builder (for split bodies) and the context width."""

    build_stack: Callable[[list[Any], State, str], tuple[list[L.Layer], State]]
    context_filters: int = 0


Factory = Callable[[Any, State, str, BuildContext], tuple[L.Layer, State]]
FACTORIES: dict[str, Factory] = {}


def register(kind: str) -> Callable[[Factory], Factory]:
    def add(factory: Factory) -> Factory:
        FACTORIES[kind] = factory
        return factory

    return add


def _unit(state: State) -> tuple[Shape, int]:
    """The shape one parameter set covers, and how many sets (2 for a pair of halves)."""
    if isinstance(state[0], tuple):
        return state[0], 2  # type: ignore[return-value]
    return state, 1  # type: ignore[return-value]


@register("split")
def _split(step, state, path, ctx):
    half, _ = half_shape(step.mask, state)
    body, _ = ctx.build_stack(step.body, (half, half), f"{path}.body")
    return L.Split(step.mask, L.Sequence(body)), state


@register("norm")
def _norm(step, state, path, ctx):
    shape, halves = _unit(state)
    return L.Norm(shape, halves, step.granularity), state


@register("pointwise")
def _pointwise(step, state, path, ctx):
    shape, halves = _unit(state)
    return L.Pointwise(shape[0], halves), state


@register("coupling")
def _coupling(step, state, path, ctx):
    shape = state[0]
    out = shape[0] * outputs_per_element(step.coupling, step.components)
    if step.network == "flowpp":
        network: nn.Module = FlowppNetwork(
            shape,
            out,
            step.filters,
            step.blocks,
            step.heads,
            step.attention,
            step.dropout,
            ctx.context_filters,
        )
    else:
        network = ResNet(shape[0], out, step.filters, step.blocks, step.resnet_norm, ctx.context_filters)
    return L.Coupling(step.coupling, network, step.components), state


@register("flip")
def _flip(step, state, path, ctx):
    return L.Flip(), state


@register("sigmoid")
def _sigmoid(step, state, path, ctx):
    return L.Sigmoid(), state


@register("squeeze")
def _squeeze(step, state, path, ctx):
    c, h, w = state
    return L.Squeeze(), (4 * c, h // 2, w // 2)


@register("factor_out")
def _factor_out(step, state, path, ctx):
    c, h, w = state
    return L.FactorOut((c // 2, h, w)), (c // 2, h, w)
