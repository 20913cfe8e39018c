"""`norm [element|channel]`: affine normalisation with data-dependent init (per element, or actnorm)."""

from __future__ import annotations

from typing import Literal

from flowspec.nodes import StepNode
from flowspec.steps.kind import StepKind, no_cost, register, same_state, unit

NormGranularity = Literal["element", "channel"]


class NormStep(StepNode):
    kind: Literal["norm"] = "norm"
    granularity: NormGranularity = "element"


def _build(run, ctx, body):
    from flowspec.layers import Norm

    shape, halves = unit(run.state_in)
    return Norm(shape, halves, run.step.granularity)


def _memory(layer, shape, halves, itemsize):
    """Its output."""
    return halves * shape[0] * shape[1] * shape[2] * itemsize


register(
    StepKind(
        name="norm",
        settings=NormStep,
        shape=same_state,
        build=_build,
        label=lambda step: step.granularity,
        flops=no_cost,
        memory=_memory,
        positional=("granularity",),
    )
)
