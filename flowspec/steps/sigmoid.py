"""`sigmoid`: the elementwise logistic sigmoid (ends a variational dequantizer, so noise is in (0, 1))."""

from __future__ import annotations

from typing import Literal

from flowspec.nodes import StepNode
from flowspec.steps.kind import ShapeProblem, StepKind, no_cost, no_label, register, whole


class SigmoidStep(StepNode):
    kind: Literal["sigmoid"] = "sigmoid"


def _shape(step, state, ctx):
    if ctx.where == "flow":
        raise ShapeProblem(
            "sigmoid belongs at the end of the variational dequantizer: in the flow it would keep the latent "
            "in (0, 1), where the normal prior cannot be sampled"
        )
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
