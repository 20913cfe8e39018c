"""Likelihood bounds on a set of images: the single-sample bound and the importance-weighted bound.

The single-sample bound averages `log_prob(x)` (one dequantization sample per image); the
importance-weighted bound with K samples is `logsumexp_k log_prob_k(x) - log K` per image, tighter as K
grows (the official Flow++ code reports K = 4096). Both are returned in bits/dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from flowspec.train.distributed import Dist

Progress = Callable[[int], None]


def to_bpd(log_prob_nats: torch.Tensor, dims: int) -> torch.Tensor:
    return -log_prob_nats / (dims * math.log(2.0))


@torch.no_grad()
def single_sample_bpd(
    model,
    images: torch.Tensor,
    batch: int,
    device: torch.device,
    dist: Dist | None = None,
    progress: Progress | None = None,
) -> float:
    """Mean bits/dim of the single-sample bound over `images`, sharded across ranks when distributed."""
    model.eval()
    shard = images[dist.rank :: dist.world] if dist else images
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of nats, image count
    for start in range(0, len(shard), batch):
        x = shard[start : start + batch].to(device)
        total[0] += model.log_prob(x).double().sum()
        total[1] += len(x)
        if progress:
            progress(len(x))
    if dist:
        dist.all_sum(total)
    dims = math.prod(images.shape[1:])
    return float(to_bpd(total[0] / total[1], dims))


@torch.no_grad()
def iw_log_prob(model, x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Importance-weighted bound in nats for each image of `x`, with `k` dequantization samples each."""
    chunk = max(1, batch // len(x))
    samples = []
    for start in range(0, k, chunk):
        reps = min(chunk, k - start)
        samples.append(model.log_prob(x.repeat_interleave(reps, dim=0)).double().view(len(x), reps))
    return torch.logsumexp(torch.cat(samples, dim=1), dim=1) - math.log(k)


@torch.no_grad()
def bounds(
    model, images: torch.Tensor, k: int, batch: int, device: torch.device, progress: Progress | None = None
) -> dict[str, float]:
    """Single-sample and (k > 1) importance-weighted bits/dim over `images`, `batch` images per forward."""
    model.eval()
    per = max(1, batch // k) if k > 1 else batch
    single, weighted = [], []
    for start in range(0, len(images), per):
        x = images[start : start + per].to(device)
        single.append(model.log_prob(x).double())
        if k > 1:
            weighted.append(iw_log_prob(model, x, k, batch))
        if progress:
            progress(len(x))
    dims = math.prod(images.shape[1:])
    out = {"bpd": float(to_bpd(torch.cat(single).mean(), dims)), "images": len(images)}
    if k > 1:
        out[f"iw{k}_bpd"] = float(to_bpd(torch.cat(weighted).mean(), dims))
    return out


@torch.no_grad()
def inversion_error(model, images: torch.Tensor, device: torch.device) -> float:
    """Max |decode(encode(v)) - v| over `images` dequantized with uniform noise: numerical invertibility."""
    model.eval()
    v = images.to(device).double() + torch.rand(images.shape, dtype=torch.float64, device=device)
    v = v.float()
    z, _ = model.encode(v)
    return float((model.decode(z) - v).abs().max())
