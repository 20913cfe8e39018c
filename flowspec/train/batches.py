"""Training batches in a resumable order: a seeded permutation per epoch, batches split across ranks.

The loop takes its batches from the object `training_batches` returns: `next(batches)` is this rank's
next batch on the device (integer images N x C x H x W), `steps_per_epoch` and `epochs_done` measure the
position, and `state_dict()` / `load_state_dict()` save and restore it in the checkpoint. `BatchStream`
serves the batches from images in (device) memory; `stream.StreamingBatches` reads the same batches from
a memory-mapped file. Both have the same `state_dict` (epoch, position, seed), so one resumes exactly
where the other stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from flowspec.errors import UserError

if TYPE_CHECKING:
    from flowspec.spec import TrainSpec
    from flowspec.train.data import ImageSet
    from flowspec.train.distributed import Dist
    from flowspec.train.stream import StreamingBatches

DEFAULT_MEMORY = 4 << 30  # bytes of training images kept in (device) memory; larger sets are streamed


def training_batches(
    train_set: ImageSet, train: TrainSpec, dist: Dist, device: torch.device, memory: int | None = None
) -> BatchStream | StreamingBatches:
    """The object the loop takes its batches from, for this rank: the in-memory stream on `device` when
    the images fit `memory` bytes (default DEFAULT_MEMORY) or have no file behind them, else the batches
    streamed from the set's memory-mapped file."""
    args = (train.batch, train.seed, dist.rank, dist.world, train.hflip)
    if train_set.file is None or train_set.images.numel() <= (DEFAULT_MEMORY if memory is None else memory):
        return BatchStream(in_memory(train_set, device), *args)
    from flowspec.train.stream import StreamingBatches

    return StreamingBatches(train_set.file, *args, device=device)


def in_memory(images: ImageSet, device: torch.device | str) -> torch.Tensor:
    """The set's images on `device`, read into memory when they are a memory-mapped view."""
    if images.file is None:
        return images.images.to(device)
    return torch.empty(images.images.shape, dtype=torch.uint8, device=device).copy_(images.images)


def check_batch(batch: int, world: int, count: int, accumulate: int = 1, spec: str | None = None) -> None:
    """A `UserError` (naming the `spec`, its file or model name, when given) unless the global `batch`
    divides among `world` processes (and into `accumulate` micro-batches within each) and `count` training
    images make at least one batch (else it names the largest batch they make)."""
    named = f"{spec}: " if spec else ""
    share = world * accumulate
    if batch % share:
        times = f" times accumulate ({accumulate})" if accumulate > 1 else ""
        raise UserError(
            f"{named}the batch ({batch}) must be divisible by the number of processes ({world}){times}"
        )
    if count < batch:
        fits = count // share * share  # the largest batch that both divides and the images fill
        lower = f"lower the batch to {fits} or fewer (--set train.batch={fits}), or " if fits else ""
        raise UserError(
            f"{named}the training set has {count} images, fewer than one batch ({batch}): "
            f"{lower}train on more images"
        )


class BatchOrder:
    """Which images make each batch, and which of them are flipped.

    Epoch `e` visits the images in the order `randperm(N, seed=(seed, e))`, in global batches of `batch`
    (the last partial batch is dropped); rank `r` of `world` takes its contiguous share of each global
    batch, and its horizontal flips (with `hflip`) are drawn per epoch from a generator seeded with
    `(seed, e, r)`. Both are computed on the CPU, a whole epoch at a time.
    """

    def __init__(self, count: int, batch: int, seed: int, rank: int = 0, world: int = 1, hflip: bool = False):
        check_batch(batch, world, count)
        self.count, self.batch, self.seed, self.rank, self.hflip = count, batch, seed, rank, hflip
        self.per_rank = batch // world
        self.steps_per_epoch = count // batch

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's images of each batch of `epoch`: steps_per_epoch x per_rank."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.count, generator=generator)[: self.steps_per_epoch * self.batch]
        start = self.rank * self.per_rank
        return order.view(self.steps_per_epoch, self.batch)[:, start : start + self.per_rank].contiguous()

    def flips(self, epoch: int) -> torch.Tensor:
        """Which of this rank's images of each batch of `epoch` are flipped: steps_per_epoch x per_rank."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 4099 + self.rank)
        return torch.rand((self.steps_per_epoch, self.per_rank), generator=generator) < 0.5

    def following(self, epoch: int, position: int) -> Iterator[torch.Tensor]:
        """The batches' indices after `position` batches of `epoch`, endlessly."""
        indices = self.indices(epoch)
        while True:
            if position == self.steps_per_epoch:
                epoch, position = epoch + 1, 0
                indices = self.indices(epoch)
            yield indices[position]
            position += 1


class Resumable:
    """Position bookkeeping, flips and `state_dict` shared by the in-memory and the streaming batches.

    An epoch's flips (and, in memory, its order) move to `device` once, when the epoch starts: taking a
    batch never waits for the device."""

    def __init__(self, order: BatchOrder, device: torch.device | str):
        self.order, self.device = order, torch.device(device)
        self.batch, self.seed, self.hflip = order.batch, order.seed, order.hflip
        self.steps_per_epoch = order.steps_per_epoch
        self.epoch, self.position = 0, 0
        self._started: int | None = None  # the epoch whose tables are on the device
        self._flips: torch.Tensor | None = None

    @property
    def epochs_done(self) -> float:
        """Completed epochs, fractional."""
        return self.epoch + self.position / self.steps_per_epoch

    def _start_epoch(self) -> None:
        if self.hflip:
            self._flips = self.order.flips(self.epoch).to(self.device)

    def _advance(self) -> int:
        """Move to the next batch; its position within the (started) epoch."""
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if self._started != self.epoch:
            self._start_epoch()
            self._started = self.epoch
        self.position += 1
        return self.position - 1

    def _flip(self, x: torch.Tensor, position: int) -> torch.Tensor:
        if not self.hflip:
            return x
        return torch.where(self._flips[position][:, None, None, None], x.flip(-1), x)

    def __iter__(self) -> Resumable:
        return self

    def state_dict(self) -> dict[str, Any]:
        position = {"epoch": self.epoch, "position": self.position, "seed": self.seed}
        return position | {"images": self.order.count, "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise UserError(f"the saved data order has seed {state['seed']}, this stream seed {self.seed}")
        saved = (state.get("images", self.order.count), state.get("batch", self.batch))  # older: not kept
        if saved != (self.order.count, self.batch):
            raise UserError(
                f"the run's data position is for {saved[0]:,} training images in batches of {saved[1]}, but "
                f"this run has {self.order.count:,} in batches of {self.batch}: resume it with the data and "
                f"batch it was trained with (--data names the data folder), or start a new run"
            )
        self.epoch, self.position, self._started = state["epoch"], state["position"], None


class BatchStream(Resumable):
    """Endless training batches for one rank from `images` in memory (on the training device)."""

    def __init__(
        self, images: torch.Tensor, batch: int, seed: int, rank: int = 0, world: int = 1, hflip: bool = False
    ):
        super().__init__(BatchOrder(len(images), batch, seed, rank, world, hflip), images.device)
        self.images = images
        self._order: torch.Tensor | None = None  # this epoch's image indices on the device

    def _start_epoch(self) -> None:
        super()._start_epoch()
        self._order = self.order.indices(self.epoch).to(self.device)

    def __next__(self) -> torch.Tensor:
        position = self._advance()
        return self._flip(self.images[self._order[position]], position)
