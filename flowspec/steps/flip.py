"""`flip`: swap the two halves of a split (the conditioning half and the transformed one)."""

from __future__ import annotations

from typing import Literal

from flowspec.nodes import StepNode
from flowspec.steps.kind import StepKind, needs_pair, no_cost, no_label, register


class FlipStep(StepNode):
    """A `flip` step."""

    kind: Literal["flip"] = "flip"


def _build(run, ctx, body):
    from flowspec.layers import Flip

    return Flip()


register(
    StepKind(
        name="flip",
        settings=FlipStep,
        shape=needs_pair,
        build=_build,
        label=no_label,
        flops=no_cost,
        memory=no_cost,
        swaps_halves=True,
    )
)
