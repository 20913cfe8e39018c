"""Freed memory stays in the process (glibc's malloc tuned by `flowspec.allocator`): large tensors come
from the heap, whose freed chunks serve the next tensors, not from fresh mappings."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import sys, torch
from flowspec.allocator import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory() and keep_freed_memory()  # once per process; the second call is free
t = torch.empty(30 << 20, dtype=torch.uint8)
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        print(lo <= t.data_ptr() < hi)
        break
else:
    print(False)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc/self/maps")
@pytest.mark.parametrize(("mode", "on_heap"), [("tuned", "True"), ("untuned", "False")])
def test_large_tensors_come_from_the_heap(mode, on_heap):
    """Untuned, a 30 MiB tensor is a fresh mapping, its pages faulted in and zeroed by the kernel at every
    allocation (0.4-2 million faults per bf16 log_prob of 64 images); tuned, it comes from the heap, where
    freed memory is kept for the next tensors (no faults per log_prob). Counting the faults of a sequence
    of allocations was not deterministic enough to test: glibc sometimes extends the heap anyway."""
    command = [sys.executable, "-c", CHILD, mode]
    assert subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip() == on_heap


def test_malloc_is_given_both_thresholds_and_a_refusal_is_said(monkeypatch):
    """The mmap threshold at 32 MiB and the trim threshold at 2 GiB - 1, in that order: with glibc's trim
    threshold (128 KiB) a freed tensor at the top of the heap goes back to the system, but only when nothing
    is allocated above it, which a test cannot arrange reliably. A malloc without mallopt, or one that
    refuses a setting, gives False."""
    from types import SimpleNamespace

    from flowspec import allocator

    calls: list[tuple[int, int]] = []

    def libc(refused: int | None) -> SimpleNamespace:
        def mallopt(param: int, value: int) -> int:
            calls.append((param, value))
            return int(param != refused)

        return SimpleNamespace(mallopt=mallopt)

    for refused, kept in ((None, True), (-1, False)):
        calls.clear()
        monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name, refused=refused: libc(refused))
        assert allocator.keep_freed_memory.__wrapped__() is kept
        assert calls == [(-3, 32 << 20), (-1, 2**31 - 1)]
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: SimpleNamespace())
    assert allocator.keep_freed_memory.__wrapped__() is False
