"""Step kinds: one module per kind, each registering a `StepKind` (see `flowspec.steps.kind`).

Importing this package imports every module in it, so a new kind needs only its module (and its
grammar rule). `Step` is the pydantic union of all kinds' settings, told apart by `kind`.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Annotated, Union

from pydantic import Field

from flowspec.steps.kind import KINDS, BuildContext, Shape, State, StepKind, fmt, kind_of, unit
from flowspec.steps.walk import ShapeIssue, StepRun, Walk, walk, written

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

Step = Annotated[Union[tuple(k.settings for k in KINDS.values())], Field(discriminator="kind")]  # type: ignore[valid-type]

for _kind in KINDS.values():
    if _kind.body:
        _kind.settings.model_rebuild(_types_namespace={"Step": Step})

__all__ = [
    "KINDS",
    "BuildContext",
    "Shape",
    "ShapeIssue",
    "State",
    "Step",
    "StepKind",
    "StepRun",
    "Walk",
    "fmt",
    "kind_of",
    "unit",
    "walk",
    "written",
]
