"""The step rows of `inspect`: one per written step, nested like the spec, with shapes and parameters.

Rows come from `flowspec.shapes.trace` (one record per written step, repeats not unrolled) and from the
parameter counts of the built model, keyed by the same dotted paths. A step inside a `repeat` counts the
parameters of all its copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flowspec.shapes import State, fmt, half_shape, trace
from flowspec.spec import CouplingSettings, FlowSpec

#: The half each mask puts first (the conditioning half of a coupling before any flip).
FIRST_HALF = {
    "stripe": "even columns",
    "checkerboard": "squares with even row + column",
    "channel": "first channels",
}


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


def coupling_settings(c: CouplingSettings) -> str:
    """Compact key settings of a coupling: `mixlogistic k32 f96 b10 h4 p0.2`."""
    parts = [c.coupling]
    if c.coupling == "mixlogistic":
        parts.append(f"k{c.components}")
    if c.network == "resnet":
        parts += ["resnet", f"f{c.filters}", f"b{c.blocks}", "bn" if c.resnet_norm == "batch" else "wn"]
    else:
        parts += [f"f{c.filters}", f"b{c.blocks}", f"h{c.heads}" if c.attention else "nin"]
        if c.dropout:
            parts.append(f"p{c.dropout:g}")
    return " ".join(parts)


def step_settings(step) -> str:
    """The step's key settings as they read in the spec."""
    if step.kind == "coupling":
        return coupling_settings(step)
    if step.kind == "repeat":
        return f"x{step.count}"
    if step.kind == "split":
        return step.mask
    if step.kind == "norm":
        return step.granularity
    return ""


def source_of(step) -> str | None:
    loc = getattr(step, "source", None)
    return f"{Path(loc.file).name}:{loc.line}" if loc is not None else None


def coupling_halves(split_body: list, prefix: str) -> dict[str, list[str]]:
    """For each coupling path in a split body: its orientation in each copy, in order of execution.

    `a>b`: half a (the mask's first half) conditions the transform of half b; a flip swaps the roles.
    """
    seen: dict[str, list[str]] = {}
    swapped = False

    def run(steps: list, pre: str) -> None:
        nonlocal swapped
        for i, step in enumerate(steps):
            path = f"{pre}.{i}"
            if step.kind == "repeat":
                for _ in range(step.count):
                    run(step.body, f"{path}.body")
            elif step.kind == "flip":
                swapped = not swapped
            elif step.kind == "coupling":
                seen.setdefault(path, []).append("b>a" if swapped else "a>b")

    run(split_body, prefix)
    return seen


def halves_label(orientations: list[str]) -> str:
    """`a>b`, or `a>b,b>a` for a step whose copies alternate."""
    unique = list(dict.fromkeys(orientations))
    return ",".join(unique)


def stack_rows(steps: list, shape, where: str, params: dict[str, int]) -> list[StepRow]:
    """Nested rows of a step stack (`where` is "flow" or "dequantize"), parameters from `params`."""
    records, _, _ = trace(steps, shape, where)
    halves: dict[str, str] = {}
    for rec in records:
        if rec.step.kind == "split":
            for path, seq in coupling_halves(rec.step.body, f"{rec.path}.body").items():
                halves[path] = halves_label(seq)
    roots: list[StepRow] = []
    open_rows: list[StepRow] = []  # the chain of containers above the current record
    for rec in records:
        step = rec.step
        row = StepRow(
            path=rec.path,
            kind=step.kind,
            settings=f"z {fmt(rec.latent[0])}" if rec.latent else step_settings(step),
            source=source_of(step),
            shape_in=fmt(rec.shape_in),
            shape_out=fmt(rec.shape_out),
            depth=rec.depth,
            state_in=rec.shape_in,
            state_out=rec.shape_out,
            latent=fmt(rec.latent[0]) if rec.latent else None,
            halves=halves.get(rec.path, ""),
            params=params.get(rec.path, 0),
        )
        del open_rows[rec.depth :]
        (open_rows[-1].children if open_rows else roots).append(row)
        open_rows.append(row)
    for root in roots:
        _sum_children(root)
    return roots


def _sum_children(row: StepRow) -> int:
    row.params += sum(_sum_children(child) for child in row.children)
    return row.params


def build_branches(spec: FlowSpec, params: dict[str, int]) -> list[Branch]:
    """The dequantizer branch and the main-flow branch of `spec`, with parameters by spec path."""
    branches = []
    deq = spec.dequantize
    if deq.kind == "variational":
        masks = [
            rec.step.mask
            for rec in trace(deq.steps, spec.data.shape, "dequantize")[0]
            if rec.step.kind == "split"
        ]
        half = half_shape(masks[0], spec.data.shape)[0] if masks else spec.data.shape
        context_shape = (deq.context.filters, half[1], half[2])  # type: ignore[index]
        context = StepRow(
            path="dequantize.context",
            kind="context",
            settings=f"f{deq.context.filters} b{deq.context.blocks}",
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


def count_couplings(steps: list) -> int:
    """Coupling layers the stack builds, repeats unrolled."""
    total = 0
    for step in steps:
        if step.kind == "coupling":
            total += 1
        elif step.kind == "split":
            total += count_couplings(step.body)
        elif step.kind == "repeat":
            total += step.count * count_couplings(step.body)
    return total
