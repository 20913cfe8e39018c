"""Whether a training step recomputes the coupling networks' dense and elementwise work in the backward
pass (selective activation checkpointing: less than half the memory) or keeps every activation.

Measured on flowpp_cifar, bf16, eager: on an H200 at batch 64 (two runs), 1.28 s per step recomputing
and 0.30 s keeping (3.6 and 11.8 GB); on a 2-core CPU at batch 8, 4.6 s and 4.45 s (1.78 and 2.45 GB;
71 and 154 MB more per image). On the GPU the step waits on the recomputation's per-op bookkeeping (a
dispatch mode on the host). `auto` keeps every activation where that fits in a share of the device's
memory (80% of a GPU's, half the RAM split among the machine's torchrun processes), and recomputes under
--compile on a GPU (`compiled`: whole networks compiled), where the graph is traced once and the
bookkeeping is gone; --compile on a CPU compiles only elementwise chains and leaves the choice as it is."""

from __future__ import annotations

import torch

from flowspec.errors import UserError
from flowspec.spec import FlowSpec

RECOMPUTE = ("auto", "on", "off")
GPU_SHARE = 0.8  # of a GPU's memory a run may plan to fill
RAM_SHARE = 0.5  # of the RAM (shared by the machine's torchrun processes)


def resolve_recompute(
    option: str, device: torch.device, compiled: bool, spec: FlowSpec, world: int = 1, precision: str = "fp32"
) -> tuple[bool, str]:
    """Whether to recompute and, for `auto`, why (else ""), in one of `world` processes training in
    `precision` (fp32 or bf16)."""
    if option not in RECOMPUTE:
        raise UserError(f"unknown --recompute {option!r}: use {', '.join(RECOMPUTE)}")
    if option != "auto":
        return option == "on", ""
    if compiled:
        return True, "auto: compiled, the recomputation is traced once"
    from flowspec import devices
    from flowspec.inspection.budget import measure, training_bytes
    from flowspec.units import fmt_bytes

    keeping = training_bytes(measure(spec), spec, world, recompute=False, precision=precision)
    available = devices.device_memory(device)  # on a CPU: this process's share of the RAM
    estimate = f"~{fmt_bytes(int(keeping))} of {fmt_bytes(available)}"
    if keeping <= (GPU_SHARE if device.type == "cuda" else RAM_SHARE) * available:
        return False, f"auto: keeping every activation fits ({estimate})"
    return True, f"auto: keeping every activation would need {estimate}"


def check_training(
    spec: FlowSpec,
    device: str | torch.device | None,
    allow_large: bool,
    precision: str | None,
    recompute: str,
    compile: bool,
) -> None:
    """`check_size` of a run of `spec` with the precision and recompute setting it will train with
    (`precision` None, a resumed run's, read later from its checkpoint: fp32 and bf16 both, each of which
    can be the larger estimate)."""
    from flowspec.devices import default_device
    from flowspec.errors import job_number
    from flowspec.inspection.budget import check_size
    from flowspec.model import compile_scope
    from flowspec.train.precision import resolve_precision

    where = default_device(device)
    compiled = compile and compile_scope(where) == "networks"
    world = job_number("WORLD_SIZE", 1)
    for computes in [resolve_precision(precision, where)[0]] if precision else ["fp32", "bf16"]:
        recomputes = resolve_recompute(recompute, where, compiled, spec, world, computes)[0]
        check_size(spec, "train", where, allow_large, recompute=recomputes, precision=computes)
