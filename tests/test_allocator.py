"""Freed memory stays in the process (glibc's malloc tuned by `flowspec.allocator`): a tensor allocated
again after one of its size was freed gets pages already faulted in, not fresh ones from the system."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import resource, sys, torch
from flowspec.allocator import keep_freed_memory
assert keep_freed_memory() and keep_freed_memory()  # once per process; the second call is free
faults = []
for mb in (8, 16, 24, 8, 16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(mb << 20, dtype=torch.uint8).fill_(1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_tensors_allocated_again_reuse_freed_pages():
    """Untuned, the second 8 and 16 MiB tensors faulted in 2,048-4,096 fresh pages each (glibc moves its
    mmap threshold up and trims the heap); tuned, none."""
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    faults = [int(n) for n in out.stdout.split()]
    assert faults[0] > 1000  # the first 8 MiB: fresh pages, 2,048 of them
    assert faults[3] < 100 and faults[4] < 100, faults
