"""The peak memory of a stretch of work (an evaluation): what `torch.cuda` allocated at most on a GPU;
on the CPU the process's peak resident size, counted from the start of the work where Linux allows it
(`/proc/self/clear_refs`), else since the process started (`getrusage`)."""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import torch

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


class PeakMemory:
    """Started at construction; `read()` gives the peak in bytes and what it counts."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.since_start = False
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self.device = device
            return
        try:
            _CLEAR.write_text("5")  # resets the peak resident size (VmHWM) to the current one
            self.since_start = True
        except OSError:
            pass

    def read(self) -> tuple[int, str]:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device), "CUDA allocated"
        if self.since_start:
            match = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
            if match:
                return int(match[1]) * 1024, "resident"
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "resident since the start"

    def __str__(self) -> str:
        peak, kind = self.read()
        return f"peak memory {peak / 1e9:.2f} GB ({kind})"
