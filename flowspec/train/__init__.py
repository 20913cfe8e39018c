"""The training stage: data, the training loop and its parts, evaluation, sampling, exports.

`flowspec.train` is this package and also the training function: calling it runs `flowspec.api.train`
(a package attribute cannot be a function once its subpackage is imported, so the package is callable).
Type checkers, which cannot see that, are shown the function (`flowspec/__init__.py`).
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any

from flowspec.api import train as _train


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _train(*args, **kwargs)


__signature__ = inspect.signature(_train)  # what inspect.signature(flowspec.train) and help() show
__doc__ = f"{__doc__}\nflowspec.train{__signature__}\n\n{inspect.cleandoc(_train.__doc__ or '')}\n"
sys.modules[__name__].__class__ = _CallablePackage
