"""`factor_out`: set half of the channels aside as a latent (multi-scale flows); the rest flows on."""

from __future__ import annotations

from typing import Literal

from flowspec.nodes import StepNode
from flowspec.steps.kind import ShapeProblem, StepKind, fmt, no_cost, no_label, register, whole


class FactorOutStep(StepNode):
    """A `factor_out` step."""

    kind: Literal["factor_out"] = "factor_out"


def _shape(step, state, ctx):
    c, h, w = whole(step, state)
    if ctx.where != "flow":
        raise ShapeProblem("factor_out is only allowed in the main flow", changes_shape=True)
    if c % 2 or c < 2:
        message = f"factor_out needs an even channel count, got {fmt(state)}"
        raise ShapeProblem(message, changes_shape=True, sized=True)
    ctx.latent((c // 2, h, w))
    return (c // 2, h, w)


def _build(run, ctx, body):
    from flowspec.layers import FactorOut

    return FactorOut(run.state_out)


register(
    StepKind(
        name="factor_out",
        settings=FactorOutStep,
        shape=_shape,
        build=_build,
        label=no_label,
        flops=no_cost,
        memory=no_cost,
    )
)
