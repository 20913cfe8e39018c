"""Shape inference through a step stack, without torch.

The validator uses it to reject a stack at the step that breaks it; `inspect` uses the same records
to print input and output shapes. Inside a split the state is a pair of half shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from flowspec.spec import FlowSpec, SourceLoc

Shape = tuple[int, int, int]
State = Union[Shape, tuple[Shape, Shape]]


@dataclass(frozen=True)
class ShapeIssue:
    """One step that cannot run on the tensor it receives."""

    path: str
    message: str
    source: SourceLoc | None


class ShapeError(Exception):
    """All shape issues of a spec. Not a ValueError, so pydantic lets it through unchanged."""

    def __init__(self, issues: list[ShapeIssue]):
        super().__init__("; ".join(f"{i.path}: {i.message}" for i in issues))
        self.issues = issues


@dataclass(frozen=True)
class StepShape:
    """A step's dotted path, the step, the state it receives and the state it returns."""

    path: str
    step: object
    shape_in: State
    shape_out: State
    depth: int
    latent: list[Shape] = field(default_factory=list)


def fmt(state: State) -> str:
    """`3x32x32`, or `(3x32x16, 3x32x16)` for a pair."""
    if isinstance(state[0], tuple):
        return "(" + ", ".join("x".join(map(str, s)) for s in state) + ")"  # type: ignore[arg-type]
    return "x".join(map(str, state))  # type: ignore[arg-type]


def half_shape(mask: str, shape: Shape) -> tuple[Shape | None, str]:
    """The shape of each half under a mask, or None and the reason it does not fit."""
    c, h, w = shape
    if mask == "channel":
        if c % 2:
            return None, f"the channel mask needs an even channel count, got {c} channels ({fmt(shape)})"
        return (c // 2, h, w), ""
    if w % 2:
        return None, f"the {mask} mask needs an even width, got width {w} ({fmt(shape)})"
    return (c, h, w // 2), ""


class _Walker:
    def __init__(self, where: str):
        self.where = where  # "flow" or "dequantize"
        self.issues: list[ShapeIssue] = []
        self.records: list[StepShape] = []

    def fail(self, path: str, step, message: str) -> None:
        self.issues.append(ShapeIssue(path, message, getattr(step, "source", None)))

    def stack(self, steps, state: State, prefix: str, depth: int, in_split: bool) -> State:
        for i, step in enumerate(steps):
            state = self.step(step, state, f"{prefix}.{i}", depth, in_split)
        return state

    def step(self, step, state: State, path: str, depth: int, in_split: bool) -> State:
        kind = step.kind
        out: State = state
        latent: list[Shape] = []
        index = len(self.records)
        if kind == "repeat":
            self.records.append(StepShape(path, step, state, state, depth))
            for _ in range(step.count):
                before = out
                out = self.stack(step.body, out, f"{path}.body", depth + 1, in_split)
                if self.issues or out == before:  # a body that keeps the shape keeps it every time
                    break
            # one record per body step is enough: drop the copies of later repetitions
            seen: set[str] = set()
            kept = self.records[: index + 1]
            for rec in self.records[index + 1 :]:
                if rec.path not in seen:
                    seen.add(rec.path)
                    kept.append(rec)
            self.records = kept
            self.records[index] = StepShape(path, step, state, out, depth)
            return out
        if kind == "split":
            if in_split:
                self.fail(path, step, "a split cannot be nested inside another split")
                return state
            half, why = half_shape(step.mask, state)  # type: ignore[arg-type]
            if half is None:
                self.fail(path, step, why)
                return state
            self.records.append(StepShape(path, step, state, state, depth))
            self.stack(step.body, (half, half), f"{path}.body", depth + 1, True)
            return state
        if kind in ("coupling", "flip"):
            if not in_split:
                self.fail(path, step, f"{kind} needs two halves: put it inside a split")
                return state
        elif kind in ("sigmoid", "squeeze", "factor_out"):
            if in_split:
                self.fail(path, step, f"{kind} cannot run inside a split")
                return state
            c, h, w = state  # type: ignore[misc]
            if kind == "squeeze":
                if h % 2 or w % 2:
                    self.fail(path, step, f"squeeze needs an even height and width, got {fmt(state)}")
                    return state
                out = (4 * c, h // 2, w // 2)
            elif kind == "factor_out":
                if self.where != "flow":
                    self.fail(path, step, "factor_out is only allowed in the main flow")
                    return state
                if c % 2 or c < 2:
                    self.fail(path, step, f"factor_out needs an even channel count, got {fmt(state)}")
                    return state
                out = (c // 2, h, w)
                latent = [(c // 2, h, w)]
        self.records.append(StepShape(path, step, state, out, depth, latent))
        return out


def trace(steps, shape: Shape, where: str = "flow") -> tuple[list[StepShape], list[ShapeIssue], State]:
    """Shape records of a stack (one per written step), the issues found, and the final state."""
    walker = _Walker(where)
    final = walker.stack(steps, shape, where, 0, False)
    return walker.records, walker.issues, final


def check_shapes(spec: FlowSpec) -> None:
    """Raise `ShapeError` listing every step of `spec` that cannot run on its input."""
    issues: list[ShapeIssue] = []
    _, flow_issues, _ = trace(spec.flow, spec.data.shape, "flow")
    issues += flow_issues
    deq = spec.dequantize
    if deq.kind == "variational":
        records, deq_issues, _ = trace(deq.steps, spec.data.shape, "dequantize")
        issues += deq_issues
        top = deq.steps
        if not top or top[-1].kind != "sigmoid":
            where = top[-1] if top else None
            issues.append(
                ShapeIssue(
                    "dequantize.steps",
                    "the variational dequantizer must end with `sigmoid`, so that its noise lies in (0, 1)",
                    getattr(where, "source", None),
                )
            )
        masks = {r.step.mask for r in records if r.step.kind == "split"}
        if len(masks) > 1:
            split = next(r for r in records if r.step.kind == "split")
            issues.append(
                ShapeIssue(
                    split.path,
                    f"all splits of the dequantizer must use one mask (its context network is split by it), "
                    f"got {', '.join(sorted(masks))}",
                    split.step.source,
                )
            )
        if any(r.step.kind == "squeeze" for r in records):
            squeeze = next(r for r in records if r.step.kind == "squeeze")
            issues.append(
                ShapeIssue(squeeze.path, "squeeze is not allowed in the dequantizer", squeeze.step.source)
            )
    if issues:
        raise ShapeError(issues)
