"""The peak memory of a stretch of work (an evaluation): what `torch.cuda` allocated at most on a GPU;
on the CPU the process's peak resident size, counted from the start of the work where Linux allows it
(`/proc/self/clear_refs`), else since the process started (`getrusage`)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

from flowspec.devices import status_bytes

_CLEAR = Path("/proc/self/clear_refs")


class PeakMemory:
    """Started at construction; `read()` gives the peak in bytes and what it counts."""

    def __init__(self, device: torch.device):
        self.device, self.cuda, self.start = device, device.type == "cuda", None
        if self.cuda:
            self.start = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            return
        try:
            _CLEAR.write_text("5")  # resets the peak resident size (VmHWM) to the current one
            self.start = status_bytes("VmRSS")
        except OSError:
            pass

    def read(self) -> tuple[int, str]:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device), "CUDA allocated"
        peak = status_bytes("VmHWM") if self.start is not None else None
        if peak is not None:
            return peak, "resident"
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "resident since the process began"

    def __str__(self) -> str:
        peak, kind = self.read()
        start = f", {self.start / 1e9:.2f} GB at the start" if self.start is not None else ""
        return f"peak memory {peak / 1e9:.2f} GB ({kind}{start})"
