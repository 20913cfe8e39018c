"""`squeeze`: trade space for channels, C x H x W -> 4C x H/2 x W/2."""

from __future__ import annotations

from typing import Literal

from flowspec.nodes import StepNode
from flowspec.steps.kind import ShapeProblem, StepKind, fmt, no_cost, no_label, register, whole


class SqueezeStep(StepNode):
    """A `squeeze` step."""

    kind: Literal["squeeze"] = "squeeze"


def _shape(step, state, ctx):
    c, h, w = whole(step, state)
    if ctx.where != "flow":
        raise ShapeProblem("squeeze is not allowed in the dequantizer", changes_shape=True)
    if h % 2 or w % 2:
        message = f"squeeze needs an even height and width, got {fmt(state)}"
        raise ShapeProblem(message, changes_shape=True, sized=True)
    return (4 * c, h // 2, w // 2)


def _build(run, ctx, body):
    from flowspec.layers import Squeeze

    return Squeeze()


register(
    StepKind(
        name="squeeze",
        settings=SqueezeStep,
        shape=_shape,
        build=_build,
        label=no_label,
        flops=no_cost,
        memory=no_cost,
    )
)
