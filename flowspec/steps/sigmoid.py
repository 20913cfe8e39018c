"""`sigmoid`: the elementwise logistic sigmoid (ends a variational dequantizer, so noise is in (0, 1))."""

from __future__ import annotations

from typing import Literal

from flowspec.nodes import StepNode
from flowspec.steps.kind import StepKind, no_cost, no_label, register, whole


class SigmoidStep(StepNode):
    """A `sigmoid` step."""

    kind: Literal["sigmoid"] = "sigmoid"


def _shape(step, state, ctx):
    return whole(step, state)


def _build(run, ctx, body):
    from flowspec.layers import Sigmoid

    return Sigmoid()


register(
    StepKind(
        name="sigmoid",
        settings=SigmoidStep,
        shape=_shape,
        build=_build,
        label=no_label,
        flops=no_cost,
        memory=no_cost,
    )
)
