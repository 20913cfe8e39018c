"""Batches streamed from a memory-mapped array through `torch.utils.data`, for sets larger than memory.

`StreamingBatches` serves exactly the batches `BatchStream` would (same order, same flips, same
`state_dict`), read by worker processes from the file: each image is one positioned read (`os.preadv`),
so a process holds only the batches in flight, whatever the size of the set. `batch_source` picks the
in-memory fast path for sets within the memory budget and streams the others.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from flowspec.train.arrays import ArrayFile
from flowspec.train.batches import BatchOrder, BatchStream, Resumable
from flowspec.train.data import ImageSet

DEFAULT_MEMORY = 4 << 30  # bytes of images kept in (device) memory; larger sets are streamed
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
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle


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
        super().__init__(BatchOrder(file.shape[0], batch, seed, rank, world), seed, rank, hflip)
        self.file, self.device = file, torch.device(device)
        self.images = file.tensor()  # a view of the memory map, for init batches and inspection
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
        self._advance()
        return self._flip(x.to(self.device, non_blocking=True))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.close()

    def close(self) -> None:
        """Stop the workers (a later batch starts them again from the current position)."""
        self._batches = None


def batch_source(
    train: ImageSet,
    batch: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    hflip: bool = False,
    device: torch.device | str = "cpu",
    memory: int | None = None,
) -> BatchStream | StreamingBatches:
    """Batches of `train`: from (device) memory when its images fit `memory` bytes (default
    DEFAULT_MEMORY) or it has no file behind it, else streamed from its memory-mapped file."""
    if train.file is None or train.images.numel() <= (DEFAULT_MEMORY if memory is None else memory):
        return BatchStream(resident(train, device, memory), batch, seed, rank, world, hflip)
    return StreamingBatches(train.file, batch, seed, rank, world, hflip, device)


def resident(images: ImageSet, device: torch.device | str, memory: int | None = None) -> torch.Tensor:
    """The set's images on `device` when they fit `memory` bytes (default DEFAULT_MEMORY), else the
    memory-mapped view on the CPU (evaluation moves each batch to the device)."""
    if images.file is None:
        return images.images.to(device)
    if images.images.numel() > (DEFAULT_MEMORY if memory is None else memory):
        return images.images
    return torch.empty(images.images.shape, dtype=torch.uint8, device=device).copy_(images.images)
