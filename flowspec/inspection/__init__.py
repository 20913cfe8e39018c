"""`flowspec inspect` and `flowspec diff`: what a spec builds, step by step, without data or training."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowspec.inspection.report import Report, make_report
from flowspec.spec import FlowSpec

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Report", "inspect_model", "inspect_spec"]


def inspect_model(
    model: nn.Module, spec: FlowSpec, target: int | None = None, measure: bool = True
) -> Report:
    """Report the steps and parameters of `model`, built from `spec`.

    `measure` adds forward FLOPs per image and the training-memory estimate (both analytic: no forward pass).
    """
    from flowspec.inspection.params import parameters_by_path

    report = make_report(spec, parameters_by_path(model), target)
    if measure:
        from flowspec.inspection.flops import forward_flops, step_flops
        from flowspec.inspection.memory import estimate_memory

        flops = step_flops(model, report)
        for row in report.rows():
            leaves = [r.path for r in row.walk() if r.leaf]
            row.flops = sum(flops.get(path, 0) for path in leaves)
        f = report.footer
        f.flops_flow, f.flops_dequantize = forward_flops(flops)
        estimate = estimate_memory(model, spec, report)
        f.memory_bytes, f.memory_note = estimate.total, estimate.note
    return report


def inspect_spec(spec: FlowSpec, measure: bool = True) -> Report:
    """Build `spec` on the meta device (no memory, no random draws) and report it (see `inspect_model`)."""
    import flowspec

    return inspect_model(flowspec.build(spec, "meta"), spec, measure=measure)
