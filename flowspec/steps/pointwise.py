"""`pointwise`: an invertible 1x1 convolution (a C x C matrix per half)."""

from __future__ import annotations

from typing import Literal

from flowspec.nodes import StepNode
from flowspec.steps.kind import StepKind, no_label, output_memory, register, same_state, unit


class PointwiseStep(StepNode):
    """A `pointwise` step."""

    kind: Literal["pointwise"] = "pointwise"


def _build(run, ctx, body):
    from flowspec.layers import Pointwise

    shape, halves = unit(run.state_in)
    return Pointwise(shape[0], halves)


def _flops(layer, shape, halves):
    c = shape[0]
    return 2 * halves * c * c * shape[1] * shape[2]


register(
    StepKind(
        name="pointwise",
        settings=PointwiseStep,
        shape=same_state,
        build=_build,
        label=no_label,
        flops=_flops,
        memory=output_memory,
    )
)
