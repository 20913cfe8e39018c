"""flowspec: a declarative compiler for normalizing-flow image models.

Pipeline: text -> parse tree -> `FlowSpec` (pydantic) -> `FlowModel` (torch) -> train / eval / sample /
inspect. Importing the package imports none of them: each public name is imported when first used
(PEP 562), so the command line starts, and handles Ctrl-C, at once; `build`, `train` and `load` import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from flowspec import errors
    from flowspec.api import load, train  # at run time the `flowspec.train` package, which calls it
    from flowspec.errors import UserError
    from flowspec.loader import load_spec, parse_spec
    from flowspec.model import FlowModel
    from flowspec.spec import FlowSpec

__version__ = "0.1.0"
__all__ = [
    "FlowModel",
    "FlowSpec",
    "UserError",
    "build",
    "errors",
    "load",
    "load_spec",
    "parse_spec",
    "train",
    "__version__",
]

#: where each public name is defined (`errors` and `train` are those modules themselves)
_LAZY = {
    "FlowModel": "flowspec.model",
    "FlowSpec": "flowspec.spec",
    "UserError": "flowspec.errors",
    "errors": "flowspec.errors",
    "load": "flowspec.api",
    "load_spec": "flowspec.loader",
    "parse_spec": "flowspec.loader",
    "train": "flowspec.train",
}


def build(spec: FlowSpec, device: str | torch.device | None = None) -> FlowModel:
    """Compile a spec into a `FlowModel` (an `nn.Module`); `device="meta"` builds it without memory or
    random draws, for counting and inspecting. The spec is validated again (`spec.model_copy(update=...)`
    does not validate): a `UserError` names a value `FlowSpec` would refuse."""
    from flowspec.builder import build as _build
    from flowspec.loader import check_valid
    from flowspec.spec import FlowSpec

    if not isinstance(spec, FlowSpec):
        raise TypeError(
            f"build takes a FlowSpec, got {type(spec).__name__}: read a .flow file with "
            "flowspec.load_spec(path)"
        )
    check_valid(spec)
    if device is not None:
        from flowspec.devices import check_cuda, parse_device

        device = parse_device(device)
        if device.type == "cuda":  # torch's own error names a driver, not the device asked for
            check_cuda(device)
    return _build(spec, device)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'flowspec' has no attribute {name!r}")
    module = import_module(_LAZY[name])
    return module if module.__name__ == f"flowspec.{name}" else getattr(module, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
