"""One optimisation step: the objective (wrapped by DDP under torchrun), Adam with the spec's schedule,
gradient clipping, the EMA of the weights, and the skipping of steps whose loss or gradient is not finite.

The loss is the official code's: the batch's mean negative log-likelihood in nats per image. Its
gradient is D ln 2 times that of bits/dim, so `clip_grad_norm` and Adam's `eps` mean what the official
launchers' values mean (clipping at 1.0 in bits/dim would be 2,129 times looser on CIFAR-10). A run begun
when the loss was bits/dim goes on as it was trained (`Updater.load_state_dict`).

A step never waits for the device: whether it is applied is a flag on the device, which fused Adam
reads (as it does for `torch.amp.GradScaler`) and the EMA multiplies its update by. The loss, the norm
and the counters are read only when the loop logs."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from flowspec.layers.base import nats_per_bpd
from flowspec.spec import TrainSpec
from flowspec.train.distributed import Dist
from flowspec.train.schedule import adam_eps, build_optimizer, build_scheduler

LOSS = "nats per image"  # the loss a checkpoint's Adam averages are in (none said: bits/dim, as before)
#: the key of a checkpoint whose run goes on as the bits/dim loss trained it (`Updater.load_state_dict`)
CLIP_IN = "clip and eps in"
#: the optimizer's own settings of how it computes (not what): a checkpoint's never replace them
_HOW = ("fused", "foreach", "capturable", "differentiable")


class Objective(nn.Module):
    """Mean negative log-likelihood of a batch in nats per image: the module DDP wraps, so its backward
    all-reduces the gradients."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.model.log_prob(x).mean()


class Updater:
    """Steps `model` with the spec's recipe. `step` counts the calls, `skipped` the steps with a
    non-finite loss or gradient (never applied) and `bad_in_row` the latest run of them; `state_dict`
    holds everything a resumed run needs."""

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
        self._ok = torch.ones((), dtype=torch.bool, device=device)  # whether the current step is applied
        self.summed_flags: Tensor | None = None  # the ranks' stop flags, summed by the last step
        self._counts = torch.zeros(2, dtype=torch.int64, device=device)  # skipped, bad in a row
        self.decay, self.recipe = train.ema, train
        self.ema: AveragedModel | None = None
        if train.ema:
            self.ema = AveragedModel(model, multi_avg_fn=self._ema_update, use_buffers=True)
            self.ema.update_parameters(model)  # the average starts from the initialised weights
            self._averaged = _grouped(self.ema.module, model)
        if compile and model.compile_for_device() == "elementwise" and self.ema is not None:
            self.ema.module.fuse_elementwise()  # its evaluations too (whole networks: the trained model only)
        self.objective: nn.Module = Objective(model)
        if dist.active:
            if compile:  # networks compiled inside DDP's forward: no graph splitting at DDP's buckets,
                # which older torch (2.6 at least) refuses for the recompute's checkpoint op
                torch._dynamo.config.optimize_ddp = False
            ids = [device.index] if device.type == "cuda" else None
            unused = any(getattr(m, "has_unused_parameters", False) for m in model.modules())
            self.objective = nn.parallel.DistributedDataParallel(
                self.objective, device_ids=ids, find_unused_parameters=unused
            )
        self.optimizer = build_optimizer(model.parameters(), train)
        self.scheduler = build_scheduler(self.optimizer, train, total_steps)
        self.nats_per_bpd = nats_per_bpd(model.spec.dims)
        self.units, self.clip = 1.0, train.clip_grad_norm or math.inf  # see `_set_units`
        self.note: str | None = None  # said after the banner: how a checkpoint of the old loss goes on
        self.accumulate = train.accumulate
        self.step = 0

    @property
    def skipped(self) -> int:
        return int(self._counts[0])

    @property
    def bad_in_row(self) -> int:
        return int(self._counts[1])

    @property
    def eval_model(self) -> nn.Module:
        """The weights to evaluate and sample with: the EMA's when the spec keeps one."""
        return self.ema.module if self.ema is not None else self.model

    def __call__(self, x: Tensor, flags: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """One step on this rank's batch `x` (in `accumulate` micro-batches whose gradients add up to the
        whole batch's). Returns, without waiting for the device, the mean bits/dim over all ranks, the
        norm of the loss's gradient (nats per image, before clipping), and whether the step was applied
        (a bool tensor). `flags` (`StopVote.flags`) travel with the step's all-reduce: their sum over the
        ranks is `summed_flags` after it."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._backward(x)
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        bad = (~torch.isfinite(loss) | ~torch.isfinite(norm)).float()
        shared = torch.stack([torch.nan_to_num(loss, 0.0, 0.0, 0.0), bad])
        if flags is not None:
            shared = torch.cat([shared, flags])
        self.dist.all_sum(shared)  # every rank skips the same steps
        self.summed_flags = shared[2:] if flags is not None else None
        self._ok = shared[1] == 0
        self.optimizer.found_inf = (~self._ok).float()  # fused Adam leaves everything as it was when set
        if self.recipe.tf_eps:
            for group in self.optimizer.param_groups:
                group["eps"] = adam_eps(self.recipe, self.step) * self.units
        self.optimizer.step()
        if self.ema is not None:
            self._update_ema()
        self._counts[0] += ~self._ok
        self._counts[1] = (self._counts[1] + 1) * ~self._ok
        self.scheduler.step()
        self.step += 1
        return shared[0] / (self.dist.world * self.nats_per_bpd), norm, self._ok

    def _backward(self, x: Tensor) -> Tensor:
        """Gradients of the batch's mean loss; with DDP, all-reduced once, after the last micro-batch."""
        parts = x.chunk(self.accumulate)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            defer = self.objective.no_sync() if self.dist.active and not last else contextlib.nullcontext()
            with defer:
                loss = self.objective(part) * (len(part) / len(x))
                loss.backward()
            total += loss.detach().float()
        return total

    def _set_units(self, units: float) -> None:
        """`clip_grad_norm`, Adam's eps and weight decay for a gradient `units` times the loss's: 1 for
        nats per image, D ln 2 for a run that the bits/dim loss trained (its steps go on as that loss made
        them)."""
        self.units = units
        self.clip = (self.recipe.clip_grad_norm or math.inf) * units
        for group in self.optimizer.param_groups:
            group["eps"] = adam_eps(self.recipe, self.step) * units
            group["weight_decay"] = self.recipe.weight_decay * units

    def _rescale_adam(self, factor: float) -> None:
        """Adam's averages as if every gradient had been `factor` times larger (its steps are the same
        but for eps): its first moments times `factor`, its second moments times its square."""
        for state in self.optimizer.state.values():
            state["exp_avg"].mul_(factor)
            state["exp_avg_sq"].mul_(factor**2)

    def _update_ema(self) -> None:
        """`self.ema.update_parameters(self.model)` without its copy of the count to the device for each
        group of tensors (from pageable memory, each waited for a GPU to finish the step)."""
        for ema, current in self._averaged:
            self._ema_update([t.detach() for t in ema], [t.detach() for t in current], None)
        self.ema.n_averaged += 1

    def _ema_update(self, ema: list[Tensor], current: list[Tensor], _: Tensor | None) -> None:
        """`ema += (1 - decay) (current - ema)` on applied steps; nothing on skipped ones."""
        if not ema[0].is_floating_point():  # flags of data-dependent init
            for e, c in zip(ema, current, strict=True):
                e.copy_(torch.where(self._ok, c, e))
            return
        delta = torch._foreach_sub(current, ema)
        torch._foreach_mul_(delta, self._ok.to(ema[0].dtype) * (1.0 - self.decay))
        torch._foreach_add_(ema, delta)

    @property
    def applied_lr(self) -> float:
        """The learning rate the latest step used (the scheduler already holds the next step's)."""
        scheduler = self.scheduler
        return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](max(0, self.step - 1))

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "skipped": self.skipped,
            "bad_in_row": self.bad_in_row,
            "loss": LOSS,
            **({CLIP_IN: "bits/dim"} if self.units != 1.0 else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(self._own_settings(state["optimizer"]))
        old_loss = state.get("loss") != LOSS
        if old_loss:  # trained on bits/dim: Adam's averages into this loss's scale
            self._rescale_adam(self.nats_per_bpd)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        if old_loss or state.get(CLIP_IN) == "bits/dim":
            self._set_units(self.nats_per_bpd)
            clip = self.recipe.clip_grad_norm
            settings = f"clip_grad_norm {clip:g}, Adam's eps and" if clip else "Adam's eps and"
            clipped = f", clipped at {self.clip:,.4g}" if clip else ""
            self.note = (
                f"note: this run began under an earlier flowspec, whose loss was bits/dim: it goes on "
                f"exactly as it would have there, where {settings} weight_decay apply to the bits/dim "
                f"gradient (the nats-per-image gradient is {self.nats_per_bpd:,.4g} times larger"
                f"{clipped}); a new run applies them to the nats-per-image gradient itself"
            )
        else:
            self._set_units(1.0)
        self._counts.copy_(torch.tensor([state["skipped"], state.get("bad_in_row", 0)]))

    def _own_settings(self, stored: dict[str, Any]) -> dict[str, Any]:
        """An optimizer state whose groups keep this optimizer's fused, foreach, ... (how it computes): a
        checkpoint from before Adam was fused says `fused: None`, which would leave a step that sets
        `found_inf` to an Adam that cannot read it (and put the step counts on the wrong device)."""
        ours = self.optimizer.param_groups
        groups = [
            {**saved, **{key: own[key] for key in _HOW if key in own}}
            for saved, own in zip(stored["param_groups"], ours, strict=False)
        ]  # a count that differs is torch's error, as before
        return {**stored, "param_groups": groups + stored["param_groups"][len(groups) :]}


def _grouped(ema: nn.Module, model: nn.Module) -> list[tuple[list[Tensor], list[Tensor]]]:
    """The EMA's parameters and buffers beside the model's, grouped by device and dtype (for foreach)."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    ours = [*ema.parameters(), *ema.buffers()]
    for averaged, current in zip(ours, [*model.parameters(), *model.buffers()], strict=True):
        group = groups.setdefault((averaged.device, averaged.dtype), ([], []))
        group[0].append(averaged)
        group[1].append(current)
    return list(groups.values())
