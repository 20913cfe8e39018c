"""Training batches in a resumable order: a seeded permutation per epoch, batches split across ranks.

The loop takes its batches from one object with this interface (a streaming loader may replace this
in-memory one): `next(batches)` is this rank's next batch on the device (integer images N x C x H x W),
`steps_per_epoch` and `epochs_done` measure the position, and `state_dict()` / `load_state_dict()`
(optional) save and restore it in the checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from flowspec.errors import UserError

if TYPE_CHECKING:
    from flowspec.spec import TrainSpec
    from flowspec.train.data import ImageSet
    from flowspec.train.distributed import Dist


def training_batches(train_set: ImageSet, train: TrainSpec, dist: Dist, device: torch.device) -> BatchStream:
    """The object the loop takes its batches from, for this rank: the in-memory stream on `device`."""
    images = train_set.images.to(device)
    return BatchStream(images, train.batch, train.seed, dist.rank, dist.world, train.hflip)


class BatchStream:
    """Endless training batches for one rank, from images held in (device) memory.

    Epoch `e` visits the images in the order `randperm(N, seed=(seed, e))`, in global batches of `batch`
    (the last partial batch is dropped); rank `r` of `world` takes its contiguous share of each global
    batch, and its horizontal flips (with `hflip`) are drawn per epoch from a generator seeded with
    `(seed, e, r)`. The position (epoch, batch within it) is the whole state, so a resumed stream
    continues with exactly the batches the uninterrupted one would have produced. An epoch's order and
    flips move to the device once, when it starts: taking a batch never waits for the device.
    """

    def __init__(
        self, images: torch.Tensor, batch: int, seed: int, rank: int = 0, world: int = 1, hflip: bool = False
    ):
        if batch % world:
            raise UserError(f"the batch ({batch}) must be divisible by the number of processes ({world})")
        if len(images) < batch:
            raise UserError(f"the training set has {len(images)} images, fewer than one batch ({batch})")
        self.images, self.batch, self.seed, self.hflip = images, batch, seed, hflip
        self.rank, self.per_rank = rank, batch // world
        self.steps_per_epoch = len(images) // batch
        self.epoch, self.position = 0, 0
        self._order: torch.Tensor | None = None  # this epoch's image indices, steps x per_rank
        self._flips: torch.Tensor | None = None

    @property
    def epochs_done(self) -> float:
        """Completed epochs, fractional."""
        return self.epoch + self.position / self.steps_per_epoch

    def _start_epoch(self) -> None:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.images), generator=generator)[: self.steps_per_epoch * self.batch]
        mine = order.view(self.steps_per_epoch, self.batch)[:, self.rank * self.per_rank :][
            :, : self.per_rank
        ]
        self._order = mine.contiguous().to(self.images.device)
        if self.hflip:
            flips = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 4099 + self.rank)
            self._flips = (torch.rand(mine.shape, generator=flips) < 0.5).to(self.images.device)

    def __next__(self) -> torch.Tensor:
        if self.position == self.steps_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._start_epoch()
        x = self.images[self._order[self.position]]
        if self.hflip:
            x = torch.where(self._flips[self.position][:, None, None, None], x.flip(-1), x)
        self.position += 1
        return x

    def __iter__(self) -> BatchStream:
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self._order = state["epoch"], state["position"], None
