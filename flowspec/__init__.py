"""flowspec: a declarative compiler for normalizing-flow image models.

Pipeline: text -> parse tree -> `FlowSpec` (pydantic) -> `FlowModel` (torch) -> train / eval / sample /
inspect. Importing the package does not import torch; `build`, `train` and `load` do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowspec import train  # the training stage's package, callable as `flowspec.train(spec, ...)`
from flowspec.api import load
from flowspec.errors import UserError
from flowspec.loader import load_spec, parse_spec
from flowspec.spec import FlowSpec

if TYPE_CHECKING:
    from flowspec.model import FlowModel

__version__ = "0.1.0"
__all__ = [
    "FlowModel",
    "FlowSpec",
    "UserError",
    "build",
    "load",
    "load_spec",
    "parse_spec",
    "train",
    "__version__",
]


def build(spec: FlowSpec, device: Any = None) -> FlowModel:
    """Compile a validated spec into a `FlowModel` (an `nn.Module`); `device="meta"` builds it without
    memory or random draws, for counting and inspecting."""
    from flowspec.builder import build as _build

    if not isinstance(spec, FlowSpec):
        raise TypeError(
            f"build takes a FlowSpec, got {type(spec).__name__}: read a .flow file with "
            "flowspec.load_spec(path)"
        )

    if device is not None:
        from flowspec.inspection.budget import parse_device

        device = parse_device(device)
    return _build(spec, device)


def __getattr__(name: str) -> Any:
    if name == "FlowModel":
        from flowspec.model import FlowModel

        return FlowModel
    raise AttributeError(name)
