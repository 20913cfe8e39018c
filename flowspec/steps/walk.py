"""The one walk over a step tree: each step's kind checks and maps the state it receives.

`walk` follows a stack from an input shape, through repeats and split bodies, and returns what every
step received and produced (`StepRun`s nested like the spec) with the issues found on the way. Each
stage reads these runs: the shape check its issues, the builder one run per layer (`unroll=True`), and
inspect one run per written step. `written` lists the steps as written, without shapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flowspec.nodes import SourceLoc
from flowspec.steps.kind import KINDS, Shape, ShapeProblem, State, StepKind


@dataclass(frozen=True)
class ShapeIssue:
    """One step that cannot run on the tensor it receives. `reads`: the settings the check read (dotted
    paths, `flow.0.mask`); `sized`: it judged the size of the shape the step receives, which the data
    shape and the repeats run before it decide."""

    path: str
    message: str
    source: SourceLoc | None
    reads: tuple[str, ...] = ()
    sized: bool = False


@dataclass
class StepRun:
    """One step as the walk met it: its dotted path, the state it received and the one it returned.

    `copy` is the copy of the innermost enclosing repeat (None outside repeats); `latent` the shapes it
    set aside; `body` the runs of its body (all copies of a repeat when unrolled, else the first).
    """

    path: str
    step: Any
    kind: StepKind
    state_in: State
    state_out: State
    depth: int
    copy: int | None = None
    latent: list[Shape] = field(default_factory=list)
    body: list[StepRun] = field(default_factory=list)

    def walk(self) -> Iterator[StepRun]:
        """This run and every run below it, in order of execution."""
        yield self
        for run in self.body:
            yield from run.walk()


@dataclass
class Walk:
    """The runs of a stack's top-level steps, the issues found, and the final state."""

    runs: list[StepRun]
    issues: list[ShapeIssue]
    final: State

    def all(self) -> Iterator[StepRun]:
        """Every run, in order of execution."""
        for run in self.runs:
            yield from run.walk()


def walk(steps: list[Any], state: State, where: str = "flow", unroll: bool = False) -> Walk:
    """Walk `steps` from `state`; `where` ("flow" or "dequantize") prefixes the paths and is told to the
    shape rules. `unroll`: a run for every copy of a repeat; else one run per written step (a repeat
    walks its body again only while that can change the shapes)."""
    walker = _Walker(where, unroll)
    runs, final = walker.stack(steps, state, where, 0, None)
    return Walk(runs, walker.issues, final)


def written(steps: list[Any], prefix: str = "") -> list[tuple[str, Any]]:
    """All steps of a stack with their dotted paths (``flow.0.body.2``), depth first, repeats not unrolled."""
    out: list[tuple[str, Any]] = []
    for i, step in enumerate(steps):
        path = f"{prefix}.{i}" if prefix else str(i)
        out.append((path, step))
        if KINDS[step.kind].body:
            out.extend(written(step.body, f"{path}.body"))
    return out


class _Walker:
    def __init__(self, where: str, unroll: bool):
        self.where = where
        self.unroll = unroll
        self.issues: list[ShapeIssue] = []
        self.lost = False  # a shape-changing step could not run: what follows is not checked

    def stack(
        self, steps: list[Any], state: State, prefix: str, depth: int, copy: int | None
    ) -> tuple[list[StepRun], State]:
        runs: list[StepRun] = []
        for i, step in enumerate(steps):
            if self.lost:
                break
            path = f"{prefix}.{i}"
            kind = KINDS[step.kind]
            ctx = _Context(self, step, path, depth, copy)
            try:
                out = kind.shape(step, state, ctx)
            except ShapeProblem as problem:
                if all(issue.path != path for issue in self.issues):  # a step wrong in several copies: once
                    reads = tuple(f"{path}.{name}" for name in problem.reads)
                    self.issues.append(ShapeIssue(path, str(problem), step.source, reads, problem.sized))
                self.lost = problem.changes_shape
                continue
            runs.append(StepRun(path, step, kind, state, out, depth, copy, ctx.latents, ctx.runs))
            state = out
        return runs, state


class _Context:
    """The `ShapeContext` a shape rule gets for one step."""

    def __init__(self, walker: _Walker, step: Any, path: str, depth: int, copy: int | None):
        self.walker, self.step, self.path, self.depth, self.copy = walker, step, path, depth, copy
        self.where = walker.where
        self.latents: list[Shape] = []
        self.runs: list[StepRun] = []
        self.calls = 0

    def body(self, state: State, copy: int | None = None) -> State:
        runs, out = self.walker.stack(
            self.step.body, state, f"{self.path}.body", self.depth + 1, self.copy if copy is None else copy
        )
        if self.walker.unroll or not self.calls:
            self.runs += runs
        self.calls += 1
        return out

    def settled(self, before: State, after: State) -> bool:
        return not self.walker.unroll and (after == before or self.walker.lost)

    def latent(self, shape: Shape) -> None:
        self.latents.append(shape)
