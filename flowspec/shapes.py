"""The shape check of a validated spec: every step must run on the tensor it receives.

It runs after validation (`load_spec` calls it, and `build` before compiling): the issues of the walk
over each stack (`flowspec.steps.walk`, each kind's shape rule), then the dequantizer's own rules.
"""

from __future__ import annotations

from flowspec.spec import FlowSpec
from flowspec.steps import ShapeIssue, walk, written
from flowspec.steps.sigmoid import SigmoidStep
from flowspec.steps.split import SplitStep


class ShapeError(Exception):
    """All shape issues of a spec."""

    def __init__(self, issues: list[ShapeIssue]):
        super().__init__("; ".join(f"{i.path}: {i.message}" for i in issues))
        self.issues = issues


def shape_issues(spec: FlowSpec) -> list[ShapeIssue]:
    """Every step of `spec` that cannot run on its input, in the order of the spec."""
    issues = walk(spec.flow, spec.data.shape, "flow").issues
    deq = spec.dequantize
    if deq.kind != "variational":
        return issues
    issues += walk(deq.steps, spec.data.shape, "dequantize").issues
    top = deq.steps
    if not top:
        no_steps = "`dequantize variational` has no steps: write them, then `sigmoid`"
        issues.append(ShapeIssue("dequantize.steps", no_steps, None))
    elif not isinstance(top[-1], SigmoidStep):
        issues.append(
            ShapeIssue(
                "dequantize.steps",
                "the variational dequantizer must end with `sigmoid`, so that its noise lies in (0, 1)",
                top[-1].source,
            )
        )
    splits = [(path, step) for path, step in written(deq.steps, "dequantize") if isinstance(step, SplitStep)]
    masks = {step.mask for _, step in splits}
    if len(masks) > 1:
        path, split = splits[0]
        issues.append(
            ShapeIssue(
                path,
                f"all splits of the dequantizer must use one mask (its context network is split by it), "
                f"got {', '.join(sorted(masks))}",
                split.source,
                tuple(f"{path}.mask" for path, _ in splits),
            )
        )
    return issues


def check_shapes(spec: FlowSpec) -> None:
    """Raise `ShapeError` listing every step of `spec` that cannot run on its input."""
    issues = shape_issues(spec)
    if issues:
        raise ShapeError(issues)


def misplaced_sigmoids(spec: FlowSpec) -> list[ShapeIssue]:
    """Sigmoids outside a split but not the dequantizer's last step (one inside a split is a shape issue):
    in the flow the latent would stay in (0, 1), where the normal prior cannot be sampled; in the
    dequantizer before its end, the noise could leave (0, 1). A rule of spec files: a checkpoint written
    before it still loads."""
    deq = spec.dequantize
    last = deq.steps[-1] if deq.kind == "variational" and deq.steps else None
    found = []
    for where, steps in (("flow", spec.flow), ("dequantize", deq.steps if deq.kind == "variational" else [])):
        for path, step in _outside_splits(steps, where):
            if isinstance(step, SigmoidStep) and step is not last:
                message = (
                    "sigmoid belongs at the end of the variational dequantizer: in the flow it would keep "
                    "the latent in (0, 1), where the normal prior cannot be sampled"
                    if where == "flow"
                    else "sigmoid may only end the dequantizer, as its last step"
                )
                found.append(ShapeIssue(path, message, step.source))
    return found


def _outside_splits(steps: list, prefix: str) -> list[tuple[str, object]]:
    """The steps of a stack with their paths, those in repeats too, not those in splits."""
    out: list[tuple[str, object]] = []
    for i, step in enumerate(steps):
        out.append((f"{prefix}.{i}", step))
        if not isinstance(step, SplitStep) and getattr(step, "body", None):
            out.extend(_outside_splits(step.body, f"{prefix}.{i}.body"))
    return out
