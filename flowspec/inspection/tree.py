"""The step rows of `inspect`: one per written step, nested like the spec, with shapes and parameters.

Rows come from the walk over each stack (`flowspec.steps.walk`, one run per written step) and from the
parameter counts of the built model, keyed by the same dotted paths. A step inside a `repeat` counts the
parameters of all its copies.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flowspec.spec import FlowSpec, context_mask
from flowspec.steps import State, StepRun, fmt, walk
from flowspec.steps.kind import is_pair
from flowspec.steps.split import FIRST_HALF as FIRST_HALF  # the legend of `inspect` reads it here
from flowspec.steps.split import half_shape


@dataclass
class StepRow:
    """One row of the tree: a written step, the dequantizer's context network or the preprocessing."""

    path: str
    kind: str
    settings: str
    source: str | None
    shape_in: str
    shape_out: str
    depth: int
    state_in: State = (0, 0, 0)
    state_out: State = (0, 0, 0)
    latent: str | None = None
    halves: str = ""
    params: int = 0
    flops: int | None = None
    children: list[StepRow] = field(default_factory=list)
    logdet_bpd: float | None = None
    inverse_error: float | None = None

    @property
    def leaf(self) -> bool:
        return not self.children

    def walk(self) -> list[StepRow]:
        """This row and all rows below it, depth first."""
        return [self] + [row for child in self.children for row in child.walk()]


@dataclass
class Branch:
    """A top-level part of the model: the dequantizer or the main flow (with its preprocessing)."""

    name: str
    title: str
    rows: list[StepRow]

    def walk(self) -> list[StepRow]:
        return [row for top in self.rows for row in top.walk()]

    @property
    def params(self) -> int:
        return sum(row.params for row in self.rows)


def source_of(step: Any) -> str | None:
    """Where a step was written (`SourceLoc.short`), or None for a step made in Python."""
    loc = getattr(step, "source", None)
    return loc.short if loc is not None else None


def coupling_halves(runs: Iterable[StepRun]) -> dict[str, list[str]]:
    """For each coupling path: its orientation in each copy, in order of execution (the runs of an
    unrolled walk).

    `a>b`: half a (the mask's first half) conditions the transform of half b; a flip swaps the roles
    until the split ends.
    """
    seen: dict[str, list[str]] = {}
    swapped = False
    for run in runs:
        if not is_pair(run.state_in):
            swapped = False
        elif run.kind.swaps_halves:
            swapped = not swapped
        elif run.kind.couples:
            seen.setdefault(run.path, []).append("b>a" if swapped else "a>b")
    return seen


def halves_label(orientations: list[str]) -> str:
    """`a>b`, or `a>b,b>a` for a step whose copies alternate."""
    unique = list(dict.fromkeys(orientations))
    return ",".join(unique)


def stack_rows(steps: list, shape: State, where: str, params: dict[str, int]) -> list[StepRow]:
    """Nested rows of a step stack (`where` is "flow" or "dequantize"), parameters from `params`."""
    unrolled = walk(steps, shape, where, unroll=True).all()
    halves = {path: halves_label(seq) for path, seq in coupling_halves(unrolled).items()}
    return [_row(run, halves, params) for run in walk(steps, shape, where).runs]


def _row(run: StepRun, halves: dict[str, str], params: dict[str, int]) -> StepRow:
    row = StepRow(
        path=run.path,
        kind=run.kind.name,
        settings=f"z {fmt(run.latent[0])}" if run.latent else run.kind.label(run.step),
        source=source_of(run.step),
        shape_in=fmt(run.state_in),
        shape_out=fmt(run.state_out),
        depth=run.depth,
        state_in=run.state_in,
        state_out=run.state_out,
        latent=fmt(run.latent[0]) if run.latent else None,
        halves=halves.get(run.path, ""),
        children=[_row(child, halves, params) for child in run.body],
    )
    row.params = params.get(run.path, 0) + sum(child.params for child in row.children)
    return row


def build_branches(spec: FlowSpec, params: dict[str, int]) -> list[Branch]:
    """The dequantizer branch and the main-flow branch of `spec`, with parameters by spec path."""
    branches = []
    deq = spec.dequantize
    if deq.kind == "variational":
        half = half_shape(context_mask(deq), spec.data.shape)
        context_shape = (deq.context.filters, half[1], half[2])  # type: ignore[index]
        context = StepRow(
            path="dequantize.context",
            kind="context",
            settings=_context_label(deq.context),
            source=None,
            shape_in=fmt(spec.data.shape),
            shape_out=fmt(context_shape),
            depth=0,
            state_in=spec.data.shape,
            state_out=context_shape,
            params=params.get("dequantize.context", 0),
        )
        rows = [context, *stack_rows(deq.steps, spec.data.shape, "dequantize", params)]
        title = "dequantize variational"
    else:
        rows, title = [], "dequantize uniform"
    branches.append(Branch("dequantize", title, rows))
    pre = StepRow(
        path="preprocess",
        kind="preprocess",
        settings=f"logit(alpha={spec.preprocess.alpha:g})",
        source=None,
        shape_in=fmt(spec.data.shape),
        shape_out=fmt(spec.data.shape),
        depth=0,
        state_in=spec.data.shape,
        state_out=spec.data.shape,
        params=params.get("preprocess", 0),
    )
    branches.append(Branch("flow", "flow", [pre, *stack_rows(spec.flow, spec.data.shape, "flow", params)]))
    return branches


def count_couplings(steps: list, shape: State, where: str) -> int:
    """Coupling layers the stack builds, repeats unrolled."""
    return sum(run.kind.couples for run in walk(steps, shape, where, unroll=True).all())


def _context_label(context) -> str:
    """`f32 b8 ln h4 wn`: the context network's key settings."""
    parts = [f"f{context.filters}", f"b{context.blocks}"]
    if context.layernorm:
        parts.append("ln")
    if context.attention:
        parts.append(f"h{context.heads}")
    if context.weight_norm:
        parts.append("wn")
    return " ".join(parts)
