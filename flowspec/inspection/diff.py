"""Differences between two resolved specs, setting by setting, and what they change in parameters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from flowspec.inspection.report import Report
from flowspec.nodes import StepNode
from flowspec.spec import FlowSpec, SourceLoc
from flowspec.steps import kind_of


@dataclass(frozen=True)
class Difference:
    """One setting (or whole node) that differs; `None` on a side where it does not exist."""

    path: str
    a: str | None
    b: str | None
    source_a: str | None
    source_b: str | None


@dataclass(frozen=True)
class StageDelta:
    """Parameters of one stage (a top-level step of a branch, or a branch total) in A and in B."""

    stage: str
    a: int | None
    b: int | None

    @property
    def delta(self) -> int:
        return (self.b or 0) - (self.a or 0)


def describe(value: Any) -> str:
    """A short text for a value or a whole node: a step by its kind and count, a list by its length."""
    if isinstance(value, StepNode):
        kind = kind_of(value)
        return f"{kind.name} {kind.label(value)} ({len(value.body)} steps)" if kind.body else kind.name
    if isinstance(value, BaseModel):
        kind = getattr(value, "kind", None)
        return str(kind) if kind is not None else type(value).__name__
    if isinstance(value, list):
        return f"{len(value)} steps"
    if isinstance(value, tuple):
        return "(" + ", ".join(map(str, value)) + ")"
    return str(value)


def _loc(node: Any, inherited: str | None) -> str | None:
    loc = getattr(node, "source", None)
    if isinstance(loc, SourceLoc):
        return f"{Path(loc.file).name}:{loc.line}"
    return inherited


def spec_differences(a: FlowSpec, b: FlowSpec) -> list[Difference]:
    """Every setting that differs between `a` and `b`, by dotted path, in the order of the spec."""
    out: list[Difference] = []

    def compare(x: Any, y: Any, path: str, src_a: str | None, src_b: str | None) -> None:
        src_a, src_b = _loc(x, src_a), _loc(y, src_b)
        if isinstance(x, BaseModel) and type(x) is type(y):
            for name in type(x).model_fields:
                if name != "source":
                    compare(
                        getattr(x, name), getattr(y, name), f"{path}.{name}" if path else name, src_a, src_b
                    )
        elif isinstance(x, list) and isinstance(y, list):
            for i in range(max(len(x), len(y))):
                xi = x[i] if i < len(x) else None
                yi = y[i] if i < len(y) else None
                if xi is None or yi is None:
                    out.append(
                        Difference(
                            f"{path}.{i}",
                            None if xi is None else describe(xi),
                            None if yi is None else describe(yi),
                            _loc(xi, None),
                            _loc(yi, None),
                        )
                    )
                else:
                    compare(xi, yi, f"{path}.{i}", src_a, src_b)
        elif x != y:
            out.append(Difference(path, describe(x), describe(y), src_a, src_b))

    compare(a, b, "", None, None)
    return out


def parameter_deltas(a: Report, b: Report) -> list[StageDelta]:
    """Parameters per stage (top-level steps of each branch, then the branch) in A and B, and the total."""
    rows: list[StageDelta] = []
    for branch_a, branch_b in zip(a.branches, b.branches, strict=False):
        tops_a = {row.path: row for row in branch_a.rows}
        tops_b = {row.path: row for row in branch_b.rows}
        for path in dict.fromkeys([*tops_a, *tops_b]):
            ra, rb = tops_a.get(path), tops_b.get(path)
            kind = (rb or ra).kind  # type: ignore[union-attr]
            name = path if kind in ("context", "preprocess") else f"{path} {kind}"
            rows.append(StageDelta(name, ra.params if ra else None, rb.params if rb else None))
        rows.append(StageDelta(f"{branch_a.name} (all)", branch_a.params, branch_b.params))
    rows.append(StageDelta("total", a.total, b.total))
    return rows


def render_diff(a: FlowSpec, b: FlowSpec, report_a: Report, report_b: Report):
    """A rich renderable: the differing settings, then the parameter deltas by stage."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    name_a, name_b = a.source or a.name, b.source or b.name
    diffs = spec_differences(a, b)
    settings = Table(box=None, pad_edge=False, header_style="bold", title_justify="left")
    for column in ("setting", "A", "B", "written at (A / B)"):
        settings.add_column(column, overflow="fold")
    for d in diffs:
        where = d.source_a if d.source_a == d.source_b else f"{d.source_a or '-'} / {d.source_b or '-'}"
        settings.add_row(
            d.path, d.a if d.a is not None else "-", d.b if d.b is not None else "-", where or ""
        )
    params = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("parameters", "A", "B", "delta"):
        params.add_column(column, justify="left" if column == "parameters" else "right")
    for s in parameter_deltas(report_a, report_b):
        params.add_row(
            s.stage,
            "-" if s.a is None else f"{s.a:,}",
            "-" if s.b is None else f"{s.b:,}",
            f"{s.delta:+,}" if s.delta else "0",
            style="bold" if s.stage == "total" else None,
        )
    head = Text.assemble(("A ", "bold"), name_a, ("   B ", "bold"), name_b)
    count = f"{len(diffs)} setting{'s' if len(diffs) != 1 else ''} differ" if diffs else "the specs are equal"
    return Group(head, Text(count), settings, Text(""), params)
