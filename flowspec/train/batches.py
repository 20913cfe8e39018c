"""Training batches in a resumable order: a seeded permutation per epoch, batches split across ranks."""

from __future__ import annotations

from typing import Any

import torch

from flowspec.errors import UserError


class BatchStream:
    """Endless training batches for one rank.

    Epoch `e` visits the images in the order `randperm(N, seed=(seed, e))`, in global batches of `batch`
    (the last partial batch is dropped); rank `r` of `world` takes its contiguous share of each global
    batch. The position (epoch, batch within it) and the flip generator are the whole state, so a
    resumed stream continues with exactly the batches the uninterrupted one would have produced.
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
        self.offset = rank * self.per_rank
        self.steps_per_epoch = len(images) // batch
        self.epoch, self.position = 0, 0
        self.flips = torch.Generator().manual_seed(seed * 1_000_003 + 7919 + rank)
        self._order: torch.Tensor | None = None

    @property
    def epochs_done(self) -> float:
        """Completed epochs, fractional."""
        return self.epoch + self.position / self.steps_per_epoch

    def order(self) -> torch.Tensor:
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(len(self.images), generator=generator)
        return self._order

    def __next__(self) -> torch.Tensor:
        if self.position == self.steps_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        start = self.position * self.batch + self.offset
        index = self.order()[start : start + self.per_rank].to(self.images.device)
        self.position += 1
        x = self.images[index]
        if self.hflip:
            flip = (torch.rand(len(x), generator=self.flips) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def __iter__(self) -> BatchStream:
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "flips": self.flips.get_state(),
            "rank": self.rank,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the flips continue too when the state is this rank's (else they stay
        this rank's own, as after a change in the number of processes)."""
        self.epoch, self.position, self._order = state["epoch"], state["position"], None
        if state.get("rank", self.rank) == self.rank:
            self.flips.set_state(state["flips"])
