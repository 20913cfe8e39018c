"""Forward FLOPs per image, counted analytically from the built modules and the spec's shapes.

Counting needs no forward pass (which would cost seconds on a CPU): each step kind's FLOP rule counts a
built layer at the shape of that step's input (inside a split: one half's shape, and the count of
halves, 2; the coupling networks keep the resolution of the half they condition on); `module_flops`
counts the convolutions, dense layers and attention of a network. 2 FLOPs per multiply-add, as torch's
`FlopCounterMode` counts; elementwise work (activations, norms, the mixture CDFs) is not counted. The
tests check the count against `FlopCounterMode` on a real forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from flowspec.inspection.report import Report
from flowspec.inspection.tree import StepRow
from flowspec.layers.networks import GatedAttention
from flowspec.spec import FlowSpec
from flowspec.steps import KINDS, Shape, StepKind, unit


def example_batch(spec: FlowSpec, n: int, device: torch.device | str = "cpu") -> Tensor:
    """`n` random valid integer images of the spec's shape and levels."""
    return torch.randint(0, spec.data.levels, (n, *spec.data.shape), device=device)


def step_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The outermost modules of each spec path (the copies of a repeat share one), in model order."""
    found: dict[str, list[nn.Module]] = {}

    def visit(module: nn.Module, parent_path: str) -> None:
        path = getattr(module, "spec_path", "") or parent_path
        if path and path != parent_path:
            found.setdefault(path, []).append(module)
        for child in module.children():
            visit(child, path)

    visit(model, "")
    return found


def _conv_out(size: int, m: nn.Conv2d, i: int) -> int:
    if m.padding == "same":
        return size
    pad = 0 if m.padding == "valid" else m.padding[i]  # type: ignore[index]
    return (size + 2 * pad - m.dilation[i] * (m.kernel_size[i] - 1) - 1) // m.stride[i] + 1


def module_flops(module: nn.Module, height: int, width: int) -> int:
    """Forward FLOPs of `module` on one image whose feature maps are `height` x `width`."""
    total = 0
    positions = height * width
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            h, w = _conv_out(height, m, 0), _conv_out(width, m, 1)
            kh, kw = m.kernel_size
            total += 2 * m.in_channels // m.groups * kh * kw * m.out_channels * h * w
        elif isinstance(m, nn.Linear):  # applied at every position (channels-last 1x1 convs)
            total += 2 * m.in_features * m.out_features * positions
        elif isinstance(m, GatedAttention):  # q k^T and attention-weighted v over all positions
            total += 4 * positions * positions * m.proj1.in_features
    return total


def leaf_modules(
    model: nn.Module, report: Report
) -> Iterator[tuple[StepRow, StepKind | None, nn.Module, Shape, int]]:
    """Every module built for a leaf row (one per copy of a repeated step), with the row's step kind
    (None for the dequantizer's context network and the preprocessing), the shape it runs at (a step's
    input, one half inside a split; else the row's output) and how many of them (2 halves in a split)."""
    modules = step_modules(model)
    for row in report.rows():
        if row.children or row.path not in modules:
            continue
        kind = KINDS.get(row.kind)
        shape, halves = unit(row.state_in if kind is not None else row.state_out)
        for module in modules[row.path]:
            yield row, kind, module, shape, halves


def step_flops(model: nn.Module, report: Report) -> dict[str, int]:
    """Forward FLOPs per image of every leaf step (all copies of a repeated step together): its kind's
    FLOP rule, `module_flops` for the parts that are not steps."""
    out: dict[str, int] = {}
    for row, kind, module, shape, halves in leaf_modules(model, report):
        if kind is not None:
            flops = kind.flops(module, shape, halves)
        else:
            flops = module_flops(module, shape[1], shape[2])
        out[row.path] = out.get(row.path, 0) + flops
    return out


def forward_flops(flops: dict[str, int]) -> tuple[int, int]:
    """FLOPs per image of the main flow (with the preprocessing) and of the dequantizer."""
    deq = sum(n for path, n in flops.items() if path.startswith("dequantize"))
    return sum(flops.values()) - deq, deq
