"""How many layers a spec unrolls to (repeats multiplied out), and the limit on it: checked before
anything is built, without torch."""

from __future__ import annotations

from typing import Any

from flowspec.errors import UserError
from flowspec.spec import FlowSpec
from flowspec.steps import kind_of, written

MAX_STEPS = 10_000  # layers after repeats are unrolled (Flow++ on CIFAR-10 has 56)


def unrolled_steps(steps: list) -> int:
    """Layers a stack of steps builds, by their kinds (`StepKind.copies`): a repeat multiplies its body."""
    total = 0
    for step in steps:
        kind = kind_of(step)
        body = unrolled_steps(step.body) if kind.body else 0
        total += kind.copies(step) * body if kind.copies else 1 + body
    return total


def _largest_repeat(steps: list, prefix: str) -> tuple[str, Any, int] | None:
    """The outermost step that copies its body (a repeat) where the stack unrolls to the most layers: (its
    path, the step, its copies), looking into steps that hold their body once (splits); None if none."""
    holders = [(f"{prefix}.{i}", s) for i, s in enumerate(steps) if kind_of(s).body]
    if not holders:
        return None
    path, step = max(holders, key=lambda item: unrolled_steps([item[1]]))
    copies = kind_of(step).copies
    if copies is None:
        return _largest_repeat(step.body, f"{path}.body")
    return path, step, copies(step)


def stacks(spec: FlowSpec) -> dict[str, list]:
    """The spec's stacks of steps by name: the flow, and the variational dequantizer's steps."""
    if spec.dequantize.kind == "variational":
        return {"flow": spec.flow, "dequantize.steps": spec.dequantize.steps}
    return {"flow": spec.flow}


def check_steps(spec: FlowSpec) -> None:
    """A `UserError` when the spec unrolls to more than `MAX_STEPS` steps, which no device could build."""
    by_name = stacks(spec)
    steps = sum(unrolled_steps(s) for s in by_name.values())
    if steps <= MAX_STEPS:
        return
    name, stack = max(by_name.items(), key=lambda item: unrolled_steps(item[1]))
    found = _largest_repeat(stack, name)
    if found is None:
        source, fix = stack[0].source, "write fewer steps"
        cause = f"{len(written(stack)):,} steps written in {name}"
    else:
        path, repeat, copies = found
        source, fix = repeat.source, "lower the repeat counts"
        cause = f"{repeat.kind} {copies} at {path} and the repeats it holds multiply"
    where = f"{source}: " if source else ""
    raise UserError(
        f"{where}the spec unrolls to {steps:,} steps ({cause}), more than the {MAX_STEPS:,} flowspec builds; "
        f"{fix}"
    )
