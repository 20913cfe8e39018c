"""`repeat N { STEPS }`: N copies of the body, one after the other, each with its own parameters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from flowspec.nodes import StepNode
from flowspec.steps.kind import StepKind, no_cost, register

if TYPE_CHECKING:
    from flowspec.steps import Step


class RepeatStep(StepNode):
    """A `repeat` step: its count and body."""

    kind: Literal["repeat"] = "repeat"
    count: int = Field(ge=1, le=1000)
    body: list[Step]


def _shape(step, state, ctx):
    for copy in range(step.count):
        before, state = state, ctx.body(state, copy)
        if ctx.settled(before, state):  # a body that keeps the shape keeps it every time
            break
    return state


def _build(run, ctx, body):
    return body  # the copies' layers, in order (each tagged with its copy by the builder)


register(
    StepKind(
        name="repeat",
        settings=RepeatStep,
        shape=_shape,
        build=_build,
        label=lambda step: f"x{step.count}",
        flops=no_cost,
        memory=no_cost,
        positional=("count",),
        body=True,
        shaped=("count",),
        copies=lambda step: step.count,
    )
)
