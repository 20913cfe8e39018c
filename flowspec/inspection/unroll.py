"""How many layers a spec unrolls to (repeats multiplied out), and the limit on it: checked before
anything is built, without torch."""

from __future__ import annotations

from flowspec.errors import UserError
from flowspec.spec import FlowSpec

MAX_STEPS = 10_000  # layers after repeats are unrolled (Flow++ on CIFAR-10 has 56)


def unrolled_steps(steps: list) -> int:
    """Layers a stack of steps builds: repeats multiply their bodies, a split adds itself."""
    total = 0
    for step in steps:
        if step.kind == "repeat":
            total += step.count * unrolled_steps(step.body)
        elif step.kind == "split":
            total += 1 + unrolled_steps(step.body)
        else:
            total += 1
    return total


def _largest_repeat(steps: list, prefix: str) -> tuple[str, object]:
    """The outermost repeat of the stack that unrolls to the most layers: (its path, the step)."""
    best = max(
        ((f"{prefix}.{i}", s) for i, s in enumerate(steps) if s.kind in ("repeat", "split")),
        key=lambda item: unrolled_steps([item[1]]),
    )
    path, step = best
    if step.kind == "split":
        return _largest_repeat(step.body, f"{path}.body")
    return path, step


def stacks(spec: FlowSpec) -> dict[str, list]:
    """The spec's stacks of steps by name: the flow, and the variational dequantizer's steps."""
    if spec.dequantize.kind == "variational":
        return {"flow": spec.flow, "dequantize.steps": spec.dequantize.steps}
    return {"flow": spec.flow}


def check_steps(spec: FlowSpec) -> None:
    """A `UserError` when the spec unrolls to more than `MAX_STEPS` steps, which no device could build."""
    by_name = stacks(spec)
    steps = sum(unrolled_steps(s) for s in by_name.values())
    if steps > MAX_STEPS:
        name, stack = max(by_name.items(), key=lambda item: unrolled_steps(item[1]))
        path, repeat = _largest_repeat(stack, name)
        where = f"{repeat.source}: " if repeat.source else ""
        raise UserError(
            f"{where}the spec unrolls to {steps:,} steps (repeat {repeat.count} at {path} and the repeats "
            f"it holds multiply), more than the {MAX_STEPS:,} flowspec builds; lower the repeat counts"
        )
