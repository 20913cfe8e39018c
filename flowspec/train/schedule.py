"""The learning-rate schedule: linear warmup, then constant, cosine, step or exponential decay (a
`LambdaLR`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from flowspec.spec import TrainSpec


@dataclass(frozen=True)
class LrFactor:
    """The factor on the base learning rate at a step (picklable, so the scheduler's state saves cleanly).

    Warmup: `min(1, step / warmup)`, from 0 at the first step, as the official launchers (a step at lr 0 still
    moves Adam's averages and its step count). After it, `constant`: 1; `cosine`: from 1 down to 0 at
    `total` steps; `step`: `gamma ** (steps after warmup // every)`; `exponential`: 1 for `hold` steps,
    then `decay` per step down to `floor` (a factor: the lowest lr over the base lr). A second warmup
    (`rewarm_at`) replaces all that from its step on: from 0 to `rewarm` (a factor) over `rewarm_steps`
    steps, as the first (0 at step `rewarm_at`), then `rewarm`.
    """

    warmup: int
    kind: str
    total: int | None
    every: int
    gamma: float
    hold: int = 0
    decay: float = 1.0
    floor: float = 0.0
    rewarm_at: int | None = None
    rewarm_steps: int = 0
    rewarm: float = 1.0

    def __call__(self, step: int) -> float:
        if self.rewarm_at is not None and step >= self.rewarm_at:
            since = step - self.rewarm_at
            return self.rewarm * (min(1.0, since / self.rewarm_steps) if self.rewarm_steps else 1.0)
        warm = min(1.0, step / self.warmup) if self.warmup else 1.0
        after = max(0, step - self.warmup)
        if self.kind == "cosine":
            span = max(1, (self.total or 1) - self.warmup)
            return warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, after / span)))
        if self.kind == "step":
            return warm * self.gamma ** (after // self.every)
        if self.kind == "exponential":
            return warm * max(self.floor, self.decay ** max(0, after - self.hold))
        return warm


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainSpec, total_steps: int | None
) -> torch.optim.lr_scheduler.LambdaLR:
    """The spec's schedule over `total_steps` (the spec's training length; None when unbounded)."""
    factor = LrFactor(
        train.warmup,
        train.schedule,
        total_steps,
        train.step_every,
        train.step_gamma,
        train.exp_hold,
        train.exp_decay,
        train.exp_floor / train.lr,
        train.rewarm_at,
        train.rewarm_steps or 0,
        (train.rewarm_lr or train.lr) / train.lr,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adam_eps(train: TrainSpec, step: int) -> float:
    """The eps for torch's Adam at `step` (from 0): the spec's, or with `tf_eps` the spec's over
    sqrt(1 - beta2^t), t = step + 1. Torch adds eps to sqrt(v) / sqrt(1 - beta2^t), TF1's Adam (the official
    Flow++ code's) to sqrt(v) itself: this makes the two updates equal. `step` counts every step, as TF's
    does; after a step skipped for a non-finite loss (which TF never skips) torch's own count is one lower,
    and the eps term is that of a step later (a difference that fades as beta2^t goes to 0)."""
    if not train.tf_eps:
        return train.eps
    return train.eps / math.sqrt(1.0 - train.betas[1] ** (step + 1))


def build_optimizer(parameters: Iterable[torch.nn.Parameter], train: TrainSpec) -> torch.optim.Adam:
    """Adam with the spec's learning rate, betas, epsilon and weight decay; fused, so that a step can be
    skipped on the device (`found_inf`)."""
    return torch.optim.Adam(
        parameters,
        lr=train.lr,
        betas=train.betas,
        eps=train.eps,
        weight_decay=train.weight_decay,
        fused=True,
    )
