"""Quantities written for people."""

from __future__ import annotations


def fmt_bytes(n: int) -> str:
    """`12.0 GiB`, `35.1 MiB`, ..."""
    unit, scale = next(
        ((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if n >= s), ("B", 1)
    )
    return f"{n / scale:.1f} {unit}" if scale > 1 else f"{n} B"
