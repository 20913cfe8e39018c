"""Batches streamed from a memory-mapped array through `torch.utils.data`, for sets larger than memory.

`StreamingBatches` serves exactly the batches `BatchStream` would (same order, same flips, same
`state_dict`), read by worker processes from the file: each image is one positioned read (`os.preadv`),
so a process holds only the batches in flight, whatever the size of the set. `batches.training_batches`
picks the in-memory fast path for sets within the memory budget and streams the others.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from flowspec.train.arrays import ArrayFile
from flowspec.train.batches import BatchOrder, Resumable

PREFETCH = 4  # batches each worker reads ahead


class Rows(torch.utils.data.Dataset):
    """Item `indices` (a tensor): those images of `file` as a uint8 batch N x C x H x W."""

    def __init__(self, file: ArrayFile):
        self.file = file
        self.row_shape = file.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape))
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.file.shape[0]

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor:
        if self._fd is None:
            self._fd = os.open(self.file.path, os.O_RDONLY)
        out = np.empty((len(indices), *self.row_shape), dtype=np.uint8)
        for row, i in zip(out, indices.tolist(), strict=True):
            if os.preadv(self._fd, [row], self.file.offset + i * self.row_bytes) != self.row_bytes:
                raise OSError(f"{self.file.path} was truncated while it was read")
        batch = torch.from_numpy(out)
        return batch.permute(0, 3, 1, 2).contiguous() if self.file.channels_last else batch

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)

    def __getstate__(self) -> dict[str, Any]:  # a worker opens its own descriptor
        return dict(self.__dict__, _fd=None)


class Positions(torch.utils.data.Sampler):
    """The batches' indices from a position onwards, endlessly (a rank's share, see `BatchOrder`)."""

    def __init__(self, order: BatchOrder, epoch: int, position: int):
        self.order, self.epoch, self.position = order, epoch, position

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.order.following(self.epoch, self.position)


def _worker_init(_: int) -> None:
    # Ctrl-C, and a SIGTERM to the whole process group (a scheduler's), are the main process's to handle:
    # it saves and stops, and closes its loader
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StreamingBatches(Resumable):
    """Endless training batches for one rank, read from `file` by `workers` processes."""

    def __init__(
        self,
        file: ArrayFile,
        batch: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        hflip: bool = False,
        device: torch.device | str = "cpu",
        workers: int | None = None,
    ):
        super().__init__(BatchOrder(file.shape[0], batch, seed, rank, world, hflip), device)
        self.file = file
        self.images = file.tensor()  # a view of the memory map (a truncated file is refused here)
        self.workers = min(4, max(1, (os.cpu_count() or 2) // 2)) if workers is None else workers
        self._batches: Iterator[torch.Tensor] | None = None

    def _start(self) -> Iterator[torch.Tensor]:
        loader = torch.utils.data.DataLoader(
            Rows(self.file),
            sampler=Positions(self.order, self.epoch, self.position),
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=PREFETCH if self.workers else None,
            worker_init_fn=_worker_init if self.workers else None,
            generator=torch.Generator(),  # its seed draw must not move the global RNG that training uses
        )
        return iter(loader)

    def __next__(self) -> torch.Tensor:
        if self._batches is None:
            self._batches = self._start()
        x = next(self._batches)
        position = self._advance()
        return self._flip(x.to(self.device, non_blocking=True), position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.close()

    def close(self) -> None:
        """Stop the workers (a later batch starts them again from the current position)."""
        self._batches = None
