"""Training batches in a resumable order: a seeded permutation per epoch, batches split across ranks.

`BatchStream` serves them from images in (device) memory; `stream.StreamingBatches` reads the same
batches from a memory-mapped file. Both iterate endlessly and have the same `state_dict`: the position
(epoch, batch within it) and the flip generator, so one resumes exactly where the other stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from flowspec.errors import UserError


class BatchOrder:
    """Which images make each batch.

    Epoch `e` visits the images in the order `randperm(N, seed=(seed, e))`, in global batches of `batch`
    (the last partial batch is dropped); rank `r` of `world` takes its contiguous share of each global batch.
    """

    def __init__(self, count: int, batch: int, seed: int, rank: int = 0, world: int = 1):
        if batch % world:
            raise UserError(f"the batch ({batch}) must be divisible by the number of processes ({world})")
        if count < batch:
            raise UserError(f"the training set has {count} images, fewer than one batch ({batch})")
        self.count, self.batch, self.seed = count, batch, seed
        self.per_rank = batch // world
        self.offset = rank * self.per_rank
        self.steps_per_epoch = count // batch
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.int64)

    def indices(self, epoch: int, position: int) -> torch.Tensor:
        """This rank's images of batch `position` of `epoch`."""
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.count, generator=generator)
        start = position * self.batch + self.offset
        return self._order[start : start + self.per_rank]

    def following(self, epoch: int, position: int) -> Iterator[torch.Tensor]:
        """The batches after `position` batches of `epoch`, endlessly."""
        while True:
            if position == self.steps_per_epoch:
                epoch, position = epoch + 1, 0
            yield self.indices(epoch, position)
            position += 1


class Resumable:
    """Position bookkeeping, flips and `state_dict` shared by the in-memory and the streaming batches."""

    def __init__(self, order: BatchOrder, seed: int, rank: int, hflip: bool):
        self.order, self.hflip = order, hflip
        self.batch, self.seed, self.steps_per_epoch = order.batch, order.seed, order.steps_per_epoch
        self.epoch, self.position = 0, 0
        self.flips = torch.Generator().manual_seed(seed * 1_000_003 + 7919 + rank)

    @property
    def epochs_done(self) -> float:
        """Completed epochs, fractional."""
        return self.epoch + self.position / self.steps_per_epoch

    def _advance(self) -> None:
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        self.position += 1

    def _flip(self, x: torch.Tensor) -> torch.Tensor:
        if not self.hflip:
            return x
        flip = (torch.rand(len(x), generator=self.flips) < 0.5).to(x.device)
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def __iter__(self) -> Resumable:
        return self

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "position": self.position, "seed": self.seed}
        return state | {"flips": self.flips.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise UserError(f"the saved data order has seed {state['seed']}, this stream seed {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
        self.flips.set_state(state["flips"])


class BatchStream(Resumable):
    """Endless training batches for one rank from `images` in memory (on the training device)."""

    def __init__(
        self, images: torch.Tensor, batch: int, seed: int, rank: int = 0, world: int = 1, hflip: bool = False
    ):
        super().__init__(BatchOrder(len(images), batch, seed, rank, world), seed, rank, hflip)
        self.images = images

    def __next__(self) -> torch.Tensor:
        self._advance()
        index = self.order.indices(self.epoch, self.position - 1).to(self.images.device)
        return self._flip(self.images[index])
