"""Everything `inspect` shows about a spec, gathered in one object that the renderers read."""

from __future__ import annotations

from dataclasses import dataclass, field

from flowspec.inspection.tree import Branch, StepRow, build_branches, count_couplings
from flowspec.spec import FlowSpec


@dataclass
class Footer:
    """Whole-model figures: FLOPs per image and training memory (None when not computed)."""

    flops_flow: int | None = None
    flops_dequantize: int | None = None
    memory_bytes: int | None = None
    memory_note: str = ""


@dataclass
class ProbeSummary:
    """What the probe ran on and what it found for the whole model."""

    batch: int
    data: str
    bpd: float
    logdet_bpd: float
    max_inverse_error: float


@dataclass
class Report:
    """A spec's parameters by branch and step, with the whole-model figures and the probe's."""

    spec: FlowSpec
    branches: list[Branch]
    unassigned: int
    target: int | None
    footer: Footer = field(default_factory=Footer)
    probe: ProbeSummary | None = None

    @property
    def total(self) -> int:
        return sum(b.params for b in self.branches) + self.unassigned

    @property
    def couplings(self) -> dict[str, int]:
        spec, deq = self.spec, self.spec.dequantize
        return {
            "flow": count_couplings(spec.flow, spec.data.shape, "flow"),
            "dequantize": count_couplings(deq.steps, spec.data.shape, "dequantize")
            if deq.kind == "variational"
            else 0,
        }

    def branch(self, name: str) -> Branch:
        return next(b for b in self.branches if b.name == name)

    def rows(self) -> list[StepRow]:
        return [row for b in self.branches for row in b.walk()]


def make_report(spec: FlowSpec, params: dict[str, int], target: int | None = None) -> Report:
    """A report of `spec` with parameters by spec path ("" for parameters outside every step)."""
    branches = build_branches(spec, params)
    known = {row.path for b in branches for row in b.walk()}
    unassigned = sum(n for path, n in params.items() if path not in known)
    return Report(spec, branches, unassigned, target if target is not None else spec.target_params)
