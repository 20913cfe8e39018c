"""`split MASK { STEPS }`: run the body on the two halves of the tensor under a mask, then merge them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from flowspec.nodes import StepNode
from flowspec.steps.kind import Shape, ShapeProblem, StepKind, fmt, is_pair, no_cost, register

if TYPE_CHECKING:
    from flowspec.steps import Step

Mask = Literal["stripe", "checkerboard", "channel"]

#: The half each mask puts first (the conditioning half of a coupling before any flip).
FIRST_HALF = {
    "stripe": "even columns",
    "checkerboard": "squares with even row + column",
    "channel": "first channels",
}


class SplitStep(StepNode):
    """A `split` step: its mask and body."""

    kind: Literal["split"] = "split"
    mask: Mask
    body: list[Step]


def half_shape(mask: str, shape: Shape) -> Shape:
    """The shape of each half under a mask; `ShapeProblem` when the mask does not fit."""
    c, h, w = shape
    if mask == "channel":
        if c % 2:
            raise ShapeProblem(
                f"the channel mask needs an even channel count, got {c} channels ({fmt(shape)})",
                reads=("mask",),
                sized=True,
            )
        return (c // 2, h, w)
    if w % 2:
        message = f"the {mask} mask needs an even width, got width {w} ({fmt(shape)})"
        raise ShapeProblem(message, reads=("mask",), sized=True)
    return (c, h, w // 2)


def _shape(step, state, ctx):
    if is_pair(state):
        raise ShapeProblem("a split cannot be nested inside another split")
    half = half_shape(step.mask, state)
    ctx.body((half, half))
    return state


def _build(run, ctx, body):
    from flowspec import layers as L

    return L.Split(run.step.mask, L.Sequence(body))


register(
    StepKind(
        name="split",
        settings=SplitStep,
        shape=_shape,
        build=_build,
        label=lambda step: step.mask,
        flops=no_cost,
        memory=no_cost,
        positional=("mask",),
        body=True,
        shaped=("mask",),
    )
)
