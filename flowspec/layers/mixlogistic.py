"""Mixture of logistics: the logit of the CDF, its log-derivative, and the inverse CDF.

Parameters carry the K components on the last dimension; `x` has one dimension less. Log-scales are
floored at MIN_LOGSCALE (the official -7) by every function here. The flow uses the
logit of the mixture CDF, so everything is done in log space: logit(c) = log c - log(1 - c), where
log(1 - c) is the log of the mixture of the components' survival functions (exact in both tails).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from flowspec.layers.fusion import Fusable, any_shape

MIN_LOGSCALE = -7.0
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-10}  # the inverse's relative step at which it stops


class _LogSigmoids(torch.autograd.Function):
    """log sigmoid(z), log sigmoid(-z) and softplus(z) from one exp and one log: with
    t = log(1 + exp(-|z|)) they are min(z, 0) - t, -max(z, 0) - t and max(z, 0) + t. torch's own
    kernels take an exp and a log1p each, and float32 log1p ran 6x slower than log on this CPU."""

    @staticmethod
    def forward(ctx, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ctx.save_for_backward(z)
        e = torch.exp(-z.abs())
        u = 1 + e
        t = torch.log(u).sub_(((u - 1) - e).div_(u))  # log1p(e), exact where 1 + e rounds (Kahan)
        pos, neg = z.clamp(min=0), z.clamp(max=0)
        return neg - t, -pos - t, pos + t

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> Tensor:
        (z,) = ctx.saved_tensors
        g_pos, g_neg, g_softplus = (torch.zeros_like(z) if g is None else g for g in grads)
        return g_pos + (g_softplus - g_neg - g_pos) * torch.sigmoid(z)  # d/dz: 1 - s, -s, s


def _z(x: Tensor, means: Tensor, logscales: Tensor) -> Tensor:
    return (x.unsqueeze(-1) - means) * torch.exp(-logscales)


@Fusable
def logit_cdf(x: Tensor, logits: Tensor, means: Tensor, logscales: Tensor) -> tuple[Tensor, Tensor]:
    """logit of the mixture CDF at x, and the log-derivative of that logit w.r.t. x."""
    logscales = logscales.clamp(min=MIN_LOGSCALE)
    log_pi = F.log_softmax(logits, -1)
    z = _z(x, means, logscales)
    log_sigmoid, log_sigmoid_of_minus, softplus = _LogSigmoids.apply(z)
    log_cdf = torch.logsumexp(log_pi + log_sigmoid, -1)
    log_sf = torch.logsumexp(log_pi + log_sigmoid_of_minus, -1)
    log_pdf = torch.logsumexp(log_pi + z - logscales - 2 * softplus, -1)
    return log_cdf - log_sf, log_pdf - log_cdf - log_sf


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products of two N x K tensors: eager, one batched matmul (3x faster than
    (a * b).sum(-1) for float64 at N = 98,304, K = 32 on a 2-core CPU: no N x K product is written);
    compiled, a sum that inductor fuses with the work that makes a and b."""
    if torch.compiler.is_compiling():
        return (a * b).sum(-1)
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


@any_shape
def _start(
    h: Tensor, logits: Tensor, means: Tensor, logscales: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """From h (N) and the mixture (N x K): its weights pi and inverse scales, its means (contiguous), the
    bracket [lo, hi] of each root (b_k = mu_k + s_k h: CDF(min_k b_k) <= sigmoid(h) <= CDF(max_k b_k)) and
    a first guess in it, the pi-weighted mean of the b_k."""
    logscales = logscales.clamp(min=MIN_LOGSCALE)
    pi, means = torch.softmax(logits, -1), means.contiguous()
    bounds = means + h.unsqueeze(-1) * torch.exp(logscales)
    lo, hi = bounds.amin(-1), bounds.amax(-1)
    return pi, means, torch.exp(-logscales), lo, hi, _dot(pi, bounds).clamp(lo, hi)


@any_shape
def _probability_space(
    x: Tensor, pi: Tensor, means: Tensor, inv_scales: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """logit(CDF(x)) and its derivative from the sums of the components' sigmoids, and where these under-
    or overflow (|logit| past ~88 in float32, ~709 in float64), or come near that: there the sigmoids
    and their products with pi are subnormal (few significant bits) or flushed to zero, each term off by up
    to the smallest normal number, which is a relative error of at most K ulps once CDF and SF are above
    it / eps (|logit| below ~71 in float32, ~672 in float64)."""
    z = (x.unsqueeze(-1) - means) * inv_scales
    pos, neg = torch.sigmoid(z), torch.sigmoid(-z)
    cdf, sf, pdf = _dot(pi, pos), _dot(pi, neg), _dot(pi, pos * neg * inv_scales)
    g, slope = torch.log(cdf) - torch.log(sf), pdf / (cdf * sf)
    finfo = torch.finfo(x.dtype)
    normal = torch.minimum(cdf, sf) >= finfo.tiny / finfo.eps
    return g, slope, ~(torch.isfinite(g) & torch.isfinite(slope) & (slope > 0) & normal)


def _logit_cdf_and_slope(
    x: Tensor,
    pi: Tensor,
    means: Tensor,
    inv_scales: Tensor,
    far_mixture: Callable[[Tensor], tuple],
    fused: str | None,
) -> tuple[Tensor, Tensor]:
    """logit(CDF(x)) and its derivative: in probability space (~3x cheaper), and in log space (`logit_cdf`
    on `far_mixture(rows)`: logits, means, log-scales) where that under- or overflows (sharp components)."""
    g, slope, far = _probability_space(x, pi, means, inv_scales, fused=fused)
    if bool(far.any()):
        g_far, log_slope = logit_cdf(x[far], *far_mixture(far))
        g, slope = g.masked_scatter(far, g_far), slope.masked_scatter(far, log_slope.exp())
    return g, slope


def inverse_logit_cdf(
    h: Tensor,
    logits: Tensor,
    means: Tensor,
    logscales: Tensor,
    tol: float | None = None,
    max_iter: int = 100,
    fused: str | None = None,
) -> tuple[Tensor, int]:
    """Solve logit(CDF(x)) = h for x; returns x and the number of iterations used.

    A vectorised safeguarded Newton method on the logit of the CDF (nearly linear in both tails, so
    Newton converges in a few steps), in h's precision, at least float32. The root is bracketed from the
    start (`_start`); a Newton step that leaves the bracket, or does not halve the previous step, or is not
    finite, is replaced by bisection (as in Numerical Recipes' rtsafe), so the method always converges. An
    element stops once its step is below tol (1 + |x|): by default 1e-10 in float64, and 1e-6 in float32
    (8 ulps; its evaluations of the CDF carry a few ulps of rounding). The work is on the unsolved elements,
    gathered again whenever half of them are done. `fused`: compile the work on N x K values
    (`fusion.Fusable`).
    """
    shape, out_dtype, work = h.shape, h.dtype, torch.promote_types(h.dtype, torch.float32)
    tol = tol if tol is not None else TOLERANCE[work]
    # rows (elements of h) in the order the mixtures lie in memory: the N x K views below copy nothing
    order = sorted(range(h.dim()), key=lambda d: -logits.stride(d))
    h = h.permute(order).reshape(-1).to(work)
    given = [t.permute(*order, -1).reshape(-1, t.shape[-1]).to(work) for t in (logits, means, logscales)]

    def compiled(rows: int) -> str | None:
        return fused if rows > 1 else None  # one row eager: compiled, it would be a graph of its own

    pi, means, inv_scales, lo, hi, x = _start(h, *given, fused=compiled(h.numel()))
    out = torch.empty_like(x)  # each row written when gathered out, or at the end
    last_step = hi - lo
    index = torch.arange(h.numel(), device=h.device)
    unsolved = torch.ones_like(index, dtype=torch.bool)

    def far_mixture(far: Tensor) -> tuple[Tensor, ...]:
        rows = index[far]  # the rare rows solved in log space, read from the inputs as given
        return tuple(t[rows] for t in given)

    iterations = 0
    while iterations < max_iter:
        left = int(unsolved.sum())
        if left == 0:
            break
        if 2 * left <= index.numel():  # gather the unsolved rows
            out[index] = x
            index, x, h, lo, hi, last_step = (t[unsolved] for t in (index, x, h, lo, hi, last_step))
            pi, means, inv_scales = pi[unsolved], means[unsolved], inv_scales[unsolved]
            unsolved = unsolved[unsolved]
        iterations += 1
        g, slope = _logit_cdf_and_slope(x, pi, means, inv_scales, far_mixture, compiled(index.numel()))
        err = g - h
        above = err > 0
        hi = torch.where(above, x, hi)
        lo = torch.where(above, lo, x)
        newton = x - err / slope
        bisect = ~((newton >= lo) & (newton <= hi) & ((newton - x).abs() <= 0.5 * last_step))
        x_new = torch.where(bisect, 0.5 * (lo + hi), newton)
        step = (x_new - x).abs()
        last_step = torch.where(bisect, 0.5 * (hi - lo), step)
        x = torch.where(unsolved, x_new, x)  # solved rows keep their root
        unsolved = unsolved & (step > tol * (1.0 + x.abs()))
    out[index] = x
    back = sorted(range(len(order)), key=order.__getitem__)
    return out.view([shape[d] for d in order]).permute(back).to(out_dtype), iterations
