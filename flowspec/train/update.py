"""One optimisation step: the objective (wrapped by DDP under torchrun), Adam with the spec's schedule,
gradient clipping, the EMA of the weights, and the skipping of steps whose loss or gradient is not finite."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from flowspec.spec import TrainSpec
from flowspec.train.distributed import Dist
from flowspec.train.schedule import build_optimizer, build_scheduler


class Objective(nn.Module):
    """Mean bits/dim of a batch: the module DDP wraps, so its backward all-reduces the gradients."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.bpd(x).mean()


class Updater:
    """Steps `model` with the spec's recipe. `step`, `skipped` (non-finite steps, never applied) and
    `bad_in_row` count the calls; `state_dict` holds everything a resumed run needs of them."""

    def __init__(
        self,
        model: nn.Module,
        train: TrainSpec,
        total_steps: int | None,
        dist: Dist,
        device: torch.device,
        compile: bool = False,
    ):
        self.model, self.dist = model, dist
        self.ema: AveragedModel | None = None
        if train.ema:
            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(train.ema), use_buffers=True)
            self.ema.update_parameters(model)  # the average starts from the initialised weights
        if compile:
            model.compile_networks()
        self.objective: nn.Module = Objective(model)
        if dist.active:
            ids = [device.index] if device.type == "cuda" else None
            self.objective = nn.parallel.DistributedDataParallel(self.objective, device_ids=ids)
        self.optimizer = build_optimizer(model.parameters(), train)
        self.scheduler = build_scheduler(self.optimizer, train, total_steps)
        self.clip = train.clip_grad_norm or math.inf
        self.step, self.skipped, self.bad_in_row = 0, 0, 0

    @property
    def eval_model(self) -> nn.Module:
        """The weights to evaluate and sample with: the EMA's when the spec keeps one."""
        return self.ema.module if self.ema is not None else self.model

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step on this rank's batch `x`: the mean bits/dim over all ranks, the gradient norm, and
        whether the step was applied (all tensors)."""
        self.model.train()
        loss = self.objective(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(norm)).float()
        shared = torch.stack([torch.nan_to_num(loss.detach().float(), 0.0, 0.0, 0.0), bad.float()])
        self.dist.all_sum(shared)
        ok = shared[1] == 0
        if ok:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.bad_in_row = 0
        else:
            self.skipped += 1
            self.bad_in_row += 1
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the order of the two
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`", UserWarning)
            self.scheduler.step()
        self.step += 1
        return shared[0] / self.dist.world, norm, ok

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.skipped = state["step"], state["skipped"]
