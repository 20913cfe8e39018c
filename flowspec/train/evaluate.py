"""Likelihood bounds on a set of images: the single-sample bound and the importance-weighted bound.

The single-sample bound averages `log_prob(x)` (one dequantization sample per image); the
importance-weighted bound with K samples is `logsumexp_k log_prob_k(x) - log K` per image, tighter as K
grows (the official Flow++ code reports K = 4096). Both are returned in bits/dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from flowspec.layers.base import nats_per_bpd
from flowspec.train.distributed import Dist, agree_to_stop
from flowspec.train.rng import Stream
from flowspec.train.signals import StopCheck, StoppedBySignal, never

if TYPE_CHECKING:
    from flowspec.model import FlowModel

Progress = Callable[[int, float], None]  # images just done, running mean bits/dim


def to_bpd(log_prob_nats: torch.Tensor, dims: int) -> torch.Tensor:
    """Bits per dimension of a log-likelihood in nats per image of `dims` values."""
    return -log_prob_nats / nats_per_bpd(dims)


def stop_point(
    stop: StopCheck, done: str, dist: Dist | None = None, device: torch.device | None = None
) -> None:
    """Raise `StoppedBySignal` if a stop signal was received (on any rank, when `dist` is given: every rank
    must reach the same stop points then). `done` says how far the work got."""
    received = stop()
    if dist is not None and dist.active:
        received, _ = agree_to_stop(dist, device or torch.device("cpu"), received, False)
    if received:
        raise StoppedBySignal(received, done)


@torch.no_grad()
def single_sample_bpd(
    model: FlowModel,
    images: torch.Tensor,
    batch: int,
    device: torch.device,
    dist: Dist | None = None,
    progress: Progress | None = None,
    stop: StopCheck = never,
) -> float:
    """Mean bits/dim of the single-sample bound over `images`, sharded across ranks when distributed.

    The batches go to `device` one at a time; before each, `stop` is asked (`StoppedBySignal` if a
    signal came).
    """
    model.eval()
    dist = dist or Dist()
    shard = images[dist.rank :: dist.world]
    rounds = math.ceil(math.ceil(len(images) / dist.world) / batch)  # the same on every rank
    dims = math.prod(images.shape[1:])
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of nats, image count
    for i in range(rounds):
        done = min(len(images), i * batch * dist.world)
        stop_point(stop, f"after {done} of {len(images)} test images", dist, device)
        x = shard[i * batch : (i + 1) * batch].to(device)
        if len(x):
            total[0] += model.log_prob(x).double().sum()
            total[1] += len(x)
        if progress and len(x):
            progress(len(x) * dist.world, float(to_bpd(total[0] / total[1], dims)))
    dist.all_sum(total)
    return float(to_bpd(total[0] / total[1], dims))


@torch.no_grad()
def iw_log_prob(
    model: FlowModel, x: torch.Tensor, k: int, batch: int, stop: StopCheck = never
) -> torch.Tensor:
    """Importance-weighted bound in nats for each image of `x`, with `k` dequantization samples each."""
    chunk = max(1, batch // len(x))
    samples = []
    for start in range(0, k, chunk):
        stop_point(stop, f"after {start} of {k} importance samples of a batch")
        reps = min(chunk, k - start)
        samples.append(model.log_prob(x.repeat_interleave(reps, dim=0)).double().view(len(x), reps))
    return torch.logsumexp(torch.cat(samples, dim=1), dim=1) - math.log(k)


@torch.no_grad()
def bounds(
    model: FlowModel,
    images: torch.Tensor,
    k: int,
    batch: int,
    device: torch.device,
    seed: int = 0,
    progress: Progress | None = None,
    stop: StopCheck = never,
) -> dict[str, float]:
    """Single-sample and (k > 1) importance-weighted bits/dim over `images`, `batch` images per forward.

    The single-sample bound takes `batch` images at a time with noise from `seed`, and the importance
    samples draw from a stream of their own (`seed` + 1), so the single-sample bound does not depend on
    `k` (its draws may still depend on `batch`: on CUDA a generator call split in two gives other values).
    """
    model.eval()
    torch.manual_seed(seed)
    importance = Stream(seed + 1, device)
    per = max(1, batch // k)  # images per importance-weighted forward of `batch` samples
    dims = math.prod(images.shape[1:])
    single, weighted = [], []
    for start in range(0, len(images), batch):
        stop_point(stop, f"after {start} of {len(images)} images")
        x = images[start : start + batch].to(device)
        single.append(model.log_prob(x).double())
        if k == 1:
            if progress:
                progress(len(x), float(to_bpd(torch.cat(single).mean(), dims)))
            continue
        for part in range(0, len(x), per):
            with importance:
                weighted.append(iw_log_prob(model, x[part : part + per], k, batch, stop))
            if progress:
                progress(len(weighted[-1]), float(to_bpd(torch.cat(weighted).mean(), dims)))
    stop_point(stop, f"after all {len(images)} images, before writing")  # a signal in the last batch too
    out = {"bpd": float(to_bpd(torch.cat(single).mean(), dims)), "images": len(images)}
    if k > 1:
        out[f"iw{k}_bpd"] = float(to_bpd(torch.cat(weighted).mean(), dims))
    return out


@torch.no_grad()
def inversion_error(
    model: FlowModel, images: torch.Tensor, device: torch.device, stop: StopCheck = never
) -> float:
    """Max |decode(encode(v)) - v| over `images` dequantized with uniform noise: numerical invertibility."""
    model.eval()
    stop_point(stop, "before the inversion check")
    v = images.to(device).double() + torch.rand(images.shape, dtype=torch.float64, device=device)
    v = v.float()
    z, _ = model.encode(v)
    stop_point(stop, "during the inversion check")
    return float((model.decode(z) - v).abs().max())
