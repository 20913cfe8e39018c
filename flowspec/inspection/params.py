"""Trainable parameters of a built model, attributed to the spec step each module was built from."""

from __future__ import annotations

from collections import defaultdict

from torch import nn


def parameters_by_path(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts keyed by `spec_path` ("" for parameters outside every step).

    Each parameter belongs to the nearest enclosing module that carries a `spec_path`, so the copies a
    repeat makes add up under their written step and a shared tensor counts once.
    """
    counts: dict[str, int] = defaultdict(int)
    seen: set[int] = set()

    def visit(module: nn.Module, owner: str) -> None:
        owner = getattr(module, "spec_path", "") or owner
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                counts[owner] += p.numel()
        for child in module.children():
            visit(child, owner)

    visit(model, "")
    return dict(counts)
