"""Seeding and capturing every random number generator a run uses, so a resumed run continues exactly."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (torch: every device's) with `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture(device: torch.device) -> dict[str, Any]:
    """The global RNG states (torch CPU/CUDA, numpy, python), in types weights-only `torch.load` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
        "python": random.getstate(),
    }


def restore(state: dict[str, Any], device: torch.device) -> None:
    """Set the global RNG states that `capture` returned (CUDA's on `device`, where it was captured)."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class Stream:
    """A second stream of torch's global random numbers (on the CPU and `device`), started from `seed`
    without moving the first: the work inside `with stream:` draws from it, and the first stream goes on
    afterwards where it was."""

    def __init__(self, seed: int, device: torch.device):
        self.device = device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            self._state = self._get()

    def _get(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    def __enter__(self) -> None:
        self._outer = self._get()
        self._set(self._state)

    def __exit__(self, *_: object) -> None:
        self._state = self._get()
        self._set(self._outer)
