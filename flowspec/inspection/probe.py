"""Run one batch through a built model and measure each step: log-det in bits/dim and inversion error.

Forward hooks on the modules that carry a `spec_path` see every step's input, output and log-det (the
sequences call their layers through `__call__`); the copies a repeat makes add up under their written step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from flowspec.errors import UserError
from flowspec.inspection.flops import example_batch, step_modules
from flowspec.inspection.memory import measure_memory
from flowspec.inspection.report import ProbeSummary, Report
from flowspec.layers.base import nats_per_bpd
from flowspec.spec import FlowSpec


@dataclass
class StepRecords:
    """Per spec path: the summed per-image log-det (N,) and the largest inversion error."""

    logdet: dict[str, Tensor] = field(default_factory=dict)
    inverse_error: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def _max_abs_diff(a, b) -> float:
    if isinstance(a, tuple):
        return max(_max_abs_diff(x, y) for x, y in zip(a, b, strict=False))
    return (a.double() - b.double()).abs().max().item()


@contextmanager
def record_steps(model: nn.Module, invert: set[str] | frozenset[str] = frozenset()) -> Iterator[StepRecords]:
    """Record every step's log-det while the block runs; invert the steps whose paths are in `invert`."""
    records = StepRecords()
    busy = False

    def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        nonlocal busy
        if busy:
            return
        if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], Tensor)):
            return  # not a bijection (the dequantizer's context network)
        path = module.spec_path
        y, logdet = output
        logdet = logdet.detach().double()
        records.logdet[path] = records.logdet[path] + logdet if path in records.logdet else logdet
        if path in invert:
            context = args[1] if len(args) > 1 else kwargs.get("context")
            busy = True
            try:
                x = module.inverse(y, context)
            finally:
                busy = False
            records.inverse_error[path] = max(records.inverse_error[path], _max_abs_diff(x, args[0]))

    handles = [
        m.register_forward_hook(hook, with_kwargs=True)
        for ms in step_modules(model).values()
        for m in ms
        if hasattr(m, "inverse")
    ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


INIT_IMAGES = 32  # at most: the probe initialises on this many images (or the spec's init_batch), as a run


def init_count(spec: FlowSpec, batch: int) -> int:
    """The images the probe initialises on: the spec's init_batch up to `INIT_IMAGES`, and the batch."""
    return max(batch, min(spec.train.init_batch, INIT_IMAGES))


def probe_images(spec: FlowSpec, batch: int, data: Path | None) -> tuple[Tensor, str]:
    """The images the probe initialises on (`init_count`; the first `batch` are probed): test images
    from `data` (through the training data loader), or random valid images."""
    count = init_count(spec, batch)
    if data is None:
        return example_batch(spec, count, "cpu"), "random images"
    if not data.exists():
        raise UserError(f"--data {data}: no such folder or file")
    from flowspec.train.data import load_split

    images = load_split(spec.data, "test", data, download=False)
    if len(images) < 2:
        raise UserError(
            f"--data {data}: the probe initialises on 2 test images or more, and {images.source} has 1"
        )
    return images.images[:count], f"test images from {data}"


def run_probe(
    model: nn.Module, spec: FlowSpec, report: Report, images: Tensor, data: str, batch: int
) -> None:
    """Initialise `model` on `images` if needed (as a run on its init_batch: a tiny batch's statistics
    would make the probe's numbers its own), run `log_prob` once in eval mode on the first `batch`, fill
    in the report (and replace its memory estimate by one measured on them)."""
    model.initialize(images)
    images = images[:batch]
    model.eval()
    leaves = {row.path for row in report.rows() if row.leaf and row.kind != "context"}
    bits = nats_per_bpd(spec.dims)
    with torch.no_grad(), record_steps(model, leaves) as records:
        bpd = (-model.log_prob(images) / bits).mean().item()
    for branch in report.branches:
        for top in branch.rows:
            _fill(top, records, bits)
    flow_rows = [r for r in report.branch("flow").walk() if r.leaf and r.logdet_bpd is not None]
    # sampling inverts the main flow only: the dequantizer's sigmoid may saturate in float32 (error inf)
    errors = [r.inverse_error for r in flow_rows if r.inverse_error is not None]
    estimate = measure_memory(model, spec, images)
    report.footer.memory_bytes, report.footer.memory_note = estimate.total, estimate.note
    report.probe = ProbeSummary(
        batch=len(images),
        data=data,
        bpd=bpd,
        logdet_bpd=sum(r.logdet_bpd for r in flow_rows),
        max_inverse_error=max(errors, default=0.0),
    )


def _fill(row, records: StepRecords, bits: float) -> float | None:
    """Set the row's log-det and inversion error (a container: the sum of its children's log-dets and the
    largest of their errors, so that a collapsed row, `--depth`, still shows them)."""
    if row.children:
        parts = [_fill(child, records, bits) for child in row.children]
        known = [p for p in parts if p is not None]
        row.logdet_bpd = sum(known) if known else None
        errors = [child.inverse_error for child in row.children if child.inverse_error is not None]
        row.inverse_error = max(errors) if errors else None
    elif row.path in records.logdet:
        row.logdet_bpd = (records.logdet[row.path] / bits).mean().item()
    if row.path in records.inverse_error:
        row.inverse_error = records.inverse_error[row.path]
    return row.logdet_bpd
