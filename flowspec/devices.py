"""The device a command runs on: its name checked, and the memory a process may still allocate there."""

from __future__ import annotations

import os
import re
import resource
from pathlib import Path

import torch

from flowspec.errors import UserError, job_number

_STATUS = Path("/proc/self/status")


def parse_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device; a `UserError` for a name torch does not know (e.g. "gpu")."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device {device!r} is not one torch knows: use cpu, cuda or cuda:N") from None


def check_cuda(device: torch.device, index: int | None = None) -> None:
    """A `UserError` unless this machine has the CUDA device `device` (or its GPU `index`)."""
    if not torch.cuda.is_available():
        raise UserError(f"--device {device} was requested but no CUDA device is available; use --device cpu")
    index = device.index if index is None else index
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise UserError(
            f"--device {device}: CUDA device {index} does not exist (this machine has {count}: "
            f"cuda:0 to cuda:{count - 1})"
        )


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device`, else cuda when available, else cpu."""
    return parse_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def status_bytes(field: str) -> int | None:
    """A size from /proc/self/status, in bytes (None where there is none)."""
    match = re.search(rf"{field}:\s+(\d+) kB", _STATUS.read_text()) if _STATUS.exists() else None
    return int(match[1]) * 1024 if match else None


#: what the process held resident and mapped when this module was imported, torch loaded and nothing of a
#: run allocated yet (torch alone maps a few GiB it never touches): not free for a run, whose own
#: allocations its estimate counts (read once, so that a check made after the model is built does not
#: count the model twice)
HELD_AT_IMPORT = (status_bytes("VmRSS") or 0, status_bytes("VmSize") or 0)


def device_memory(device: str | torch.device = "cpu") -> int:
    """Bytes a process may still allocate on `device`: the GPU's memory, or its share of the RAM (the
    processes of a torchrun job on one machine share it: LOCAL_WORLD_SIZE; bounded by its cgroup's memory
    limit) less what the process held resident at import, and at most its address-space limit less the
    address space it mapped then (`HELD_AT_IMPORT`)."""
    device = torch.device(device)
    if device.type == "cuda":
        check_cuda(device)
        return torch.cuda.get_device_properties(device).total_memory
    shared = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    try:
        cgroup = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cgroup.isdigit():
            shared.append(int(cgroup))
    except OSError:
        pass
    resident, mapped = HELD_AT_IMPORT
    limits = [min(shared) // processes_on_this_machine() - resident]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft - mapped)
    return max(0, min(limits))


def processes_on_this_machine() -> int:
    """The processes of this torchrun job on this machine (1 outside torchrun)."""
    return job_number("LOCAL_WORLD_SIZE", 1)
