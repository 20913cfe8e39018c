"""The arithmetic precision of a run: fp32, bf16, or auto (bf16 where the hardware does it natively).

bf16 runs the coupling networks and the dequantizer's context network under `torch.autocast`; weights,
optimizer state, log-determinants, the mixture's log-densities and its inverse, the 1x1 convolutions'
determinants and the dequantizer's log q stay in float32 (or float64).
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowspec.errors import UserError

PRECISIONS = ("fp32", "bf16", "auto")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device) -> str | None:
    """Why `device` computes in bfloat16 natively (a short phrase), or None when it does not."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        with torch.cuda.device(device):  # is_bf16_supported asks the current device, not `device`
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        return f"{torch.cuda.get_device_name(device)} has bf16" if native else None
    if device.type != "cpu":
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    flags = [f for f in _CPU_BF16_FLAGS if f in _cpu_flags()]
    if not flags and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        flags = ["avx512_bf16"]
    if capability.startswith(("AVX512", "AMX")) and flags:
        return f"CPU {capability} with {' and '.join(flags)}"
    return None


def check_precision(precision: str) -> None:
    """A `UserError` unless `precision` is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """The precision to run (`fp32` or `bf16`) and, for `auto`, why it was chosen (else "")."""
    check_precision(precision)
    if precision != "auto":
        return precision, ""
    reason = native_bf16(device)
    if reason is None:
        return "fp32", f"auto: no native bf16 on this {device.type}"
    return "bf16", f"auto: {reason}"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: plain float32)."""
    return torch.bfloat16 if precision == "bf16" else None
