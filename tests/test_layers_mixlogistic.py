"""Mixture of logistics: densities against a direct formula, and the inverse CDF's accuracy and speed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flowspec.layers import mixlogistic


def _params(n: int, k: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=gen, dtype=dtype)
    means = 2 * torch.randn(n, k, generator=gen, dtype=dtype)
    logscales = torch.randn(n, k, generator=gen, dtype=dtype).clamp(min=mixlogistic.MIN_LOGSCALE)
    return logits, means, logscales


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_shared_log_sigmoids_equal_torchs_kernels_in_both_tails_with_gradients(dtype):
    """One exp and one log for log sigmoid(z), log sigmoid(-z) and softplus(z), exact where 1 + exp(-|z|)
    rounds to 1 (|z| > 17 in float32, > 37 in float64), and the derivative 1/2 at 0."""
    z = torch.cat(
        [torch.tensor([0.0, 1e-9, -1e-9, 20.0, -20.0, 40.0, -40.0, 90.0, -90.0]), 8 * torch.randn(200)]
    )
    z = z.to(dtype).requires_grad_()
    mine = mixlogistic._LogSigmoids.apply(z)
    plain = F.logsigmoid(z), F.logsigmoid(-z), F.softplus(z)  # softplus(z) = z past 20: a hair off
    zero = torch.zeros((), dtype=torch.float64)
    exact = [
        -torch.logaddexp(-z.double(), zero),
        -torch.logaddexp(z.double(), zero),
        torch.logaddexp(z.double(), zero),
    ]
    for got, want in zip(mine, exact, strict=True):
        assert torch.allclose(
            got.double(), want, rtol=4 * torch.finfo(dtype).eps, atol=torch.finfo(dtype).tiny
        )
    weights = torch.randn(3, z.numel(), dtype=dtype)
    (got,) = torch.autograd.grad(
        sum((w * t).sum() for w, t in zip(weights, mine, strict=True)), z, retain_graph=True
    )
    (want,) = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, plain, strict=True)), z)
    assert torch.allclose(got, want, atol=16 * torch.finfo(dtype).eps)  # sums of weighted terms
    (at_zero,) = torch.autograd.grad(mine[0][0], z, retain_graph=True)
    assert at_zero[0] == 0.5
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(
            lambda t: mixlogistic._LogSigmoids.apply(t), (z[1:50].detach().requires_grad_(),)
        )
        (only_softplus,) = torch.autograd.grad(mine[2].sum(), z)  # the other two outputs get no gradient
        assert torch.allclose(only_softplus, torch.sigmoid(z))


def test_logit_cdf_and_its_slope_match_the_direct_formula():
    logits, means, logscales = _params(50, 4, torch.float64)
    x = 3 * torch.randn(50, dtype=torch.float64)
    pi = torch.softmax(logits, -1)
    z = (x[:, None] - means) * torch.exp(-logscales)
    cdf = (pi * torch.sigmoid(z)).sum(-1)
    pdf = (pi * torch.sigmoid(z) * torch.sigmoid(-z) * torch.exp(-logscales)).sum(-1)
    g, log_slope = mixlogistic.logit_cdf(x, logits, means, logscales)
    assert torch.allclose(g, torch.logit(cdf))
    assert torch.allclose(log_slope, (pdf / (cdf * (1 - cdf))).log())


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).abs() / (1 + b.double().abs())


def test_inverse_is_accurate_in_float32_in_few_iterations():
    """float32 is solved in float32: the root is within 1e-6 (relative) of the float64 solver's for the
    same h, about as far as float32 rounding of h moves the root itself."""
    logits, means, logscales = _params(20000, 32)
    x = 4 * torch.randn(20000, generator=torch.Generator().manual_seed(1))
    h, log_slope = mixlogistic.logit_cdf(x, logits, means, logscales)
    x2, iterations = mixlogistic.inverse_logit_cdf(h, logits, means, logscales)
    assert x2.dtype == torch.float32 and x2.shape == x.shape
    assert iterations <= 20
    exact, _ = mixlogistic.inverse_logit_cdf(h.double(), logits.double(), means.double(), logscales.double())
    steep = log_slope > -1  # where the CDF is not flat
    assert steep.float().mean() > 0.5
    assert _relative(exact, x)[steep].max() < 1e-6  # float32 rounding of h
    assert _relative(x2, exact)[steep].max() < 1e-6  # the float32 solve
    assert _relative(x2, x)[steep].max() < 2e-6


def test_float32_is_solved_in_float32_and_float64_in_float64(monkeypatch):
    """The CDF is evaluated in the input's precision (bf16 in float32): a float64 solve of float32 input
    took twice the time for half an ulp."""
    seen = []
    evaluate = mixlogistic._probability_space

    def spy(x, *mixture, fused=None):
        seen.append({x.dtype, *(t.dtype for t in mixture)})
        return evaluate(x, *mixture, fused=fused)

    monkeypatch.setattr(mixlogistic, "_probability_space", spy)
    for given, work in [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float64,) * 2,
    ]:
        logits, means, logscales = _params(50, 4, given)
        found, _ = mixlogistic.inverse_logit_cdf(torch.randn(50).to(given), logits, means, logscales)
        assert found.dtype == given and seen and all(dtypes == {work} for dtypes in seen)
        seen.clear()


def test_the_inverse_reads_the_mixtures_in_any_layout(monkeypatch):
    """A coupling's mixtures are views of a channels-last network output ((N, H, W, C, K) in memory); the
    solver takes their rows in memory order, so that its N x K views of them copy nothing, and returns x in
    h's layout: the values from contiguous inputs."""
    n, c, height, width, k = 2, 3, 4, 5, 6
    gen = torch.Generator().manual_seed(2)
    stored = torch.randn(n, height, width, c, 3 * k, generator=gen, dtype=torch.float64)
    logits, means, logscales = stored.permute(0, 3, 1, 2, 4).split(k, -1)  # (N, C, H, W, K) views
    assert not means.is_contiguous()
    h = 3 * torch.randn(n, c, height, width, generator=gen, dtype=torch.float64)
    start, storages = mixlogistic._start, []

    def spy(*args, fused=None):
        storages.extend(t.untyped_storage().data_ptr() for t in args[1:])
        return start(*args, fused=fused)

    monkeypatch.setattr(mixlogistic, "_start", spy)
    found, _ = mixlogistic.inverse_logit_cdf(h, logits, means, logscales)
    assert storages == [stored.untyped_storage().data_ptr()] * 3
    contiguous = (t.contiguous() for t in (logits, means, logscales))
    want, _ = mixlogistic.inverse_logit_cdf(h, *contiguous)
    assert found.shape == h.shape
    torch.testing.assert_close(found, want, rtol=1e-12, atol=1e-12)
    again, _ = mixlogistic.logit_cdf(found, logits, means, logscales)
    torch.testing.assert_close(again, h, rtol=1e-9, atol=1e-9)


def test_float32_tails_past_its_exponent_range_are_solved_in_log_space():
    """In float32 the sigmoids underflow where the logit passes about -88 (its complement's, +88): such
    rows are solved in log space, to float32 accuracy."""
    x = torch.tensor([-95.0, -90.0, -101.0, 92.0, 99.0])
    logits, means, logscales = torch.zeros(5, 4), torch.linspace(-0.3, 0.3, 4).expand(5, 4), torch.zeros(5, 4)
    h, _ = mixlogistic.logit_cdf(x, logits, means, logscales)
    assert (h.abs() > 88).all() and (h.abs() < 103).all()
    found, _ = mixlogistic.inverse_logit_cdf(h, logits, means, logscales)
    torch.testing.assert_close(found, x, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tails_near_the_exponent_range_are_solved_in_log_space_too(dtype):
    """Short of the exponent's range the CDF (or SF) is finite but made of terms that the sigmoids flush
    to zero or leave subnormal: a wide component of small weight under a sharp one of large weight, or a
    second component a little further out (its sigmoid flushed while the first's is normal). Such rows are
    solved in log space as well."""
    edge = 88.0 if dtype == torch.float32 else 709.0
    x = -torch.linspace(edge - 30, edge + 15, 91, dtype=torch.float64)
    x = torch.cat([x, -x])
    n = x.numel()
    cases = [  # (logits, means, logscales) of two components
        ([0.0, 20.0], [0.0, 0.0], [0.0, mixlogistic.MIN_LOGSCALE]),
        ([0.0, 0.0], [0.0, 3.0], [0.0, 0.0]),
    ]
    for mixture in cases:
        logits, means, logscales = (torch.tensor(t, dtype=torch.float64).expand(n, 2) for t in mixture)
        h, _ = mixlogistic.logit_cdf(x, logits, means, logscales)
        exact, _ = mixlogistic.inverse_logit_cdf(h, logits, means, logscales)
        found, _ = mixlogistic.inverse_logit_cdf(*(t.to(dtype) for t in (h, logits, means, logscales)))
        assert found.dtype == dtype
        assert _relative(exact, x).max() < 1e-12
        assert _relative(found, exact).max() < (1e-6 if dtype == torch.float32 else 1e-12)


def test_the_inverse_of_no_elements_and_of_one():
    logits, means, logscales = _params(1, 4, torch.float64)
    found, _ = mixlogistic.inverse_logit_cdf(torch.zeros(0, 3), *(t.expand(0, 3, 4) for t in _params(1, 4)))
    assert found.shape == (0, 3) and found.dtype == torch.float32
    x = torch.tensor(0.3, dtype=torch.float64)
    h, _ = mixlogistic.logit_cdf(x, logits[0], means[0], logscales[0])
    found, _ = mixlogistic.inverse_logit_cdf(h, logits[0], means[0], logscales[0])
    assert found.shape == () and abs(float(found) - 0.3) < 1e-10


def test_inverse_of_a_typical_mixture_takes_a_handful_of_iterations():
    logits, means, logscales = _params(4096, 32)
    logscales, means = -1 + 0.3 * logscales, 0.5 * means
    x = 2 * torch.randn(2, 8, 256, generator=torch.Generator().manual_seed(1))
    shaped = [t.view(2, 8, 256, 32) for t in (logits, means, logscales)]
    h, _ = mixlogistic.logit_cdf(x, *shaped)
    x2, iterations = mixlogistic.inverse_logit_cdf(h, *shaped)
    assert x2.shape == x.shape and (x2 - x).abs().max() < 1e-5
    assert iterations <= 10


def test_inverse_is_stable_in_the_tails():
    logits, means, logscales = _params(1000, 8, torch.float64)
    scales = torch.exp(logscales).amax(-1)
    x = torch.cat([means.amin(-1)[:500] - 40 * scales[:500], means.amax(-1)[500:] + 40 * scales[500:]])
    h, _ = mixlogistic.logit_cdf(x, logits, means, logscales)
    assert torch.isfinite(h).all() and h.abs().min() > 20  # sigmoid(h) is 0 or 1 to float32
    x2, iterations = mixlogistic.inverse_logit_cdf(h, logits, means, logscales)
    assert torch.isfinite(x2).all() and (x2 - x).abs().max() < 1e-8 * (1 + x.abs().max())
    assert iterations < 30


def test_inverse_of_sharp_mixture_counts_iterations():
    # components with tiny scales make the CDF a staircase: Newton needs the bisection safeguard
    logits = torch.zeros(100, 3, dtype=torch.float64)
    means = torch.tensor([-5.0, 0.0, 5.0], dtype=torch.float64).expand(100, 3)
    logscales = torch.full((100, 3), mixlogistic.MIN_LOGSCALE, dtype=torch.float64)
    # points within 10 scales of a step (between the steps the CDF is flat to float64: no unique root)
    x = means[0, torch.arange(100) % 3] + 10 * torch.linspace(-1, 1, 100, dtype=torch.float64) * math.exp(-7)
    h, _ = mixlogistic.logit_cdf(x, logits, means, logscales)
    x2, iterations = mixlogistic.inverse_logit_cdf(h, logits, means, logscales)
    assert (x2 - x).abs().max() < 1e-9
    assert 5 <= iterations <= 60


def test_every_function_floors_the_log_scales():
    """The official floor of -7 on log-scales applies inside each function, not only in the coupling."""
    logits, means, logscales = _params(200, 4, torch.float64)
    below = logscales.clone()
    below[:, 0] = -20.0
    floored = below.clamp(min=mixlogistic.MIN_LOGSCALE)
    x = torch.randn(200, dtype=torch.float64)
    f = mixlogistic
    h, log_slope = f.logit_cdf(x, logits, means, floored)
    h_below, log_slope_below = f.logit_cdf(x, logits, means, below)
    assert torch.equal(h_below, h) and torch.equal(log_slope_below, log_slope)
    assert torch.equal(
        f.inverse_logit_cdf(h, logits, means, below)[0], f.inverse_logit_cdf(h, logits, means, floored)[0]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_inverse_holds_where_sharp_components_put_the_logit_past_the_exponent_range(dtype):
    """Log-scales at the floor (-7, as trained Flow++ components reach) put the logit of the CDF past
    +-700 a unit or two from the means, where sigmoids underflow in float64: the solver then works in log
    space and still finds x (it stopped at the underflow boundary, x = 1.96 for 5)."""
    x = torch.tensor([1.0, 2.0, 5.0, -2.0, -0.5], dtype=dtype)
    logits = torch.tensor([0.0, 1.0, -1.0, 0.5], dtype=dtype).expand(5, 4)
    means = torch.tensor([-0.1, 0.0, 0.1, 0.2], dtype=dtype).expand(5, 4)
    logscales = torch.tensor([-7.0, -6.5, -7.0, -6.0], dtype=dtype).expand(5, 4)
    h, _ = mixlogistic.logit_cdf(x, logits, means, logscales)
    assert h.abs().max() > 1900
    found, iterations = mixlogistic.inverse_logit_cdf(h, logits, means, logscales)
    torch.testing.assert_close(found, x, rtol=1e-6, atol=1e-6)
    assert iterations < 30


def test_sharp_rows_still_unsolved_after_others_converge_are_solved_with_their_own_mixtures():
    """Ordinary rows converge in a few steps and leave the active set; the sharp rows after them (each
    its own means) are then solved in log space from their own parameters, not from the rows at the
    same position in the shrunken set."""
    logits, means, logscales = _params(12, 4, torch.float64)
    x = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sharp = torch.arange(12) >= 8
    offsets = torch.tensor([-6.0, -2.0, 3.0, 7.0], dtype=torch.float64)
    means[sharp] = offsets.view(4, 1) + torch.tensor([-0.1, 0.0, 0.1, 0.2], dtype=torch.float64)
    logscales[sharp] = mixlogistic.MIN_LOGSCALE
    x[sharp] = offsets + torch.tensor([2.0, -1.5, 1.0, -2.0], dtype=torch.float64)  # the logit past +-700
    h, _ = mixlogistic.logit_cdf(x, logits, means, logscales)
    assert h[sharp].abs().min() > 700 and h[~sharp].abs().max() < 100
    found, _ = mixlogistic.inverse_logit_cdf(h, logits, means, logscales)
    torch.testing.assert_close(found, x, rtol=1e-8, atol=1e-8)
