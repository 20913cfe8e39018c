"""`norm [element|channel]`: affine normalisation with data-dependent init (per element, or actnorm)."""

from __future__ import annotations

from typing import Literal

from flowspec.nodes import StepNode
from flowspec.steps.kind import StepKind, no_cost, output_memory, register, same_state, unit

NormGranularity = Literal["element", "channel"]


class NormStep(StepNode):
    """A `norm` step and its granularity."""

    kind: Literal["norm"] = "norm"
    granularity: NormGranularity = "element"


def _build(run, ctx, body):
    from flowspec.layers import Norm

    shape, halves = unit(run.state_in)
    return Norm(shape, halves, run.step.granularity)


register(
    StepKind(
        name="norm",
        settings=NormStep,
        shape=same_state,
        build=_build,
        label=lambda step: step.granularity,
        flops=no_cost,
        memory=output_memory,
        positional=("granularity",),
    )
)
