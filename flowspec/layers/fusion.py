"""Elementwise chains that `torch.compile` may fuse while convolutions, matmuls and attention stay eager.

On a 2-core CPU, whole coupling networks compiled by inductor ran slower than eager (a bf16 training
step at batch 8: 1.69 against 2.11 img/s), but the elementwise work between the kernels (concat_elu and
its dropout mask, the gated residuals, the mixture's logit-CDF: many passes over memory) fuses well.
Compiling only these chains made log_prob at batch 64 5-15% faster in bf16 and 6% in float32, sampling
4%, and a training step at batch 8 2-5% (bench/RESULTS.md); compiling the inverse CDF's work too made
its solver (float32) twice as fast again.

Modules that call a `Fusable` have a `fused` attribute: None runs it eager, a torch.compile backend name
runs it compiled with that backend (`FlowModel.fuse_elementwise` sets them all).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch


class Fusable:
    """`fn(*args)` eager, or with `fused="inductor"` (any torch.compile backend) compiled, one graph per
    input shape (`dynamic`: one graph for any shape); the compiled function is made on first use and shared
    by every caller."""

    def __init__(self, fn: Callable[..., Any], dynamic: bool = False):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.dynamic = dynamic
        self._compiled: dict[str, Callable[..., Any]] = {}

    def __call__(self, *args: Any, fused: str | None = None) -> Any:
        if fused is None:
            return self.fn(*args)
        if fused not in self._compiled:
            # inductor's C++ toolchain lookup warns on CUDA builds of torch without a GPU; it needs none
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            self._compiled[fused] = torch.compile(self.fn, backend=fused, dynamic=self.dynamic)
        if self.dynamic:  # dynamo guards on a view's base: a graph per base size, unless no gradient needs it
            args = tuple(_detached(a) for a in args)
        return self._compiled[fused](*args)


def _detached(value: Any) -> Any:
    """A tensor that needs no gradient as a tensor of its own (not a view); anything else as it is."""
    return value.detach() if isinstance(value, torch.Tensor) and not value.requires_grad else value


def any_shape(fn: Callable[..., Any]) -> Fusable:
    """`Fusable` with one graph for inputs of any shape: for work on a set of rows that shrinks."""
    return Fusable(fn, dynamic=True)


def allow_recompiles(graphs: int) -> None:
    """Let dynamo keep at least `graphs` graphs per compiled function (its default is 8): one per input
    shape, grad mode and autocast state."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), graphs))
