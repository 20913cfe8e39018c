"""The fast kernels compute what the plain ones do: chunked-matmul attention (bf16 on the CPU) against the
fused kernel, concat_elu against elu(cat([x, -x])), a layer of concat_elu against the two composed, in
float64 with gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from flowspec.layers import attention as attention_module
from flowspec.layers.attention import attention, chunked_attention
from flowspec.layers.concat_elu import concat_elu, project_concat_elu
from flowspec.layers.mixlogistic import MIN_LOGSCALE, inverse_logit_cdf, logit_cdf
from flowspec.layers.networks import gated_residual


def test_concat_elu_is_elu_of_x_and_minus_x_with_exact_gradients():
    x = torch.randn(3, 4, 5, dtype=torch.float64).mul_(3)
    x[0, 0, :2] = 0.0  # the kink
    x[0, 1] = torch.tensor([-700.0, -40.0, -1e-9, 1e-9, 40.0])  # exp(-|x|) underflowing, cancelling
    assert torch.allclose(concat_elu(x), F.elu(torch.cat([x, -x], -1)), atol=1e-15)
    assert torch.autograd.gradcheck(concat_elu, (x[1:].clone().requires_grad_(),))
    x.requires_grad_()
    grad = torch.randn(3, 4, 10, dtype=torch.float64)
    (mine,) = torch.autograd.grad(concat_elu(x), x, grad)
    (plain,) = torch.autograd.grad(F.elu(torch.cat([x, -x], -1)), x, grad)
    assert torch.allclose(mine, plain, atol=1e-15)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_concat_elu_under_torch_compile_keeps_its_gradient(backend):
    """torch 2.11's dynamo returned a zero gradient for this Function while its forward wrote in place
    (every compiled Flow++ network trained wrong on the first GPU check)."""
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 4, 10, dtype=torch.float64)
    compiled = torch.compile(lambda t: (concat_elu(t) * grad).sum(), backend=backend, fullgraph=True)
    (mine,) = torch.autograd.grad(compiled(x), x)
    (plain,) = torch.autograd.grad((F.elu(torch.cat([x, -x], -1)) * grad).sum(), x)
    assert torch.allclose(mine, plain, atol=1e-12)
    torch._dynamo.reset()


def test_gated_residual_is_x_plus_a_times_sigmoid_b_with_exact_gradients():
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 8, dtype=torch.float64).mul_(4).requires_grad_()
    a, b = y[..., :4], y[..., 4:]
    assert torch.allclose(gated_residual(x, y), x + a * torch.sigmoid(b), atol=1e-15)
    assert torch.autograd.gradcheck(gated_residual, (x, y))


def _qkv(b: int = 5, length: int = 7, d: int = 3, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, length, d, generator=gen, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("fused", [False, True], ids=["chunked-forward", "fused-forward"])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chunked_attention_and_its_gradients_equal_the_fused_kernel_in_float64(monkeypatch, chunk, fused):
    monkeypatch.setattr(attention_module, "SCORES", chunk * 7 * 7)  # 5 slices of 7 positions
    monkeypatch.setattr(attention_module, "fused_forward", lambda: fused)
    calls = []
    fused_kernel = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a: calls.append(1) or fused_kernel(*a))
    q, k, v = _qkv()
    assert attention_module._chunk(5, 7) == chunk
    out = chunked_attention(q, k, v)
    assert len(calls) == fused
    assert torch.allclose(out, fused_kernel(q, k, v), atol=1e-12)
    assert torch.autograd.gradcheck(chunked_attention, (q, k, v))


@pytest.mark.parametrize("amx", [False, True])
def test_the_fused_forward_is_taken_where_the_cpu_has_amx_tiles(monkeypatch, request, amx):
    request.addfinalizer(attention_module.has_amx_tiles.cache_clear)  # the machine's own answer after
    attention_module.has_amx_tiles.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert attention_module.fused_forward() is amx
    attention_module.has_amx_tiles.cache_clear()
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the probe: chunks
    assert attention_module.fused_forward() is False


def test_chunked_attention_is_a_well_formed_custom_op():
    torch.library.opcheck(chunked_attention, _qkv())


@pytest.mark.parametrize("fused", [False, True], ids=["chunked-forward", "fused-forward"])
def test_bf16_on_the_cpu_takes_the_chunked_kernel_and_matches_float32(monkeypatch, fused):
    monkeypatch.setattr(attention_module, "fused_forward", lambda: fused)
    calls = []

    def counted(*tensors):
        calls.append(1)
        return chunked_attention(*tensors)

    monkeypatch.setattr(attention_module, "chunked_attention", counted)
    q, k, v = (t.detach().view(2, 3, 7, 4).float() for t in _qkv(6, 7, 4))  # N x heads x L x d
    reference = F.scaled_dot_product_attention(q, k, v)
    bf16 = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = attention(*bf16)
    assert calls == [1] and out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() < 0.05
    with torch.no_grad():  # nothing to differentiate: a fused forward needs no custom op (nor its copies)
        assert attention(*bf16).equal(out)
    assert calls == [1] + [1] * (not fused)
    assert attention(q, k, v).equal(reference)  # float32: the fused kernel itself
    assert calls == [1] + [1] * (not fused)


def test_a_fused_forward_without_gradients_reads_q_k_v_where_they_lie(monkeypatch):
    """q, k and v are strided views of one projection: the fused kernel gives the custom op's values
    without copying them into N * heads x L x d tensors first."""
    monkeypatch.setattr(attention_module, "fused_forward", lambda: True)
    qkv = torch.randn(2, 7, 3, 3, 4, dtype=torch.bfloat16)  # N x L x (q, k, v) x heads x d
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    assert not q.is_contiguous()
    with torch.no_grad():
        out = attention(q, k, v)
    flat = [t.reshape(6, 7, 4).contiguous() for t in (q, k, v)]
    assert out.equal(chunked_attention(*flat).view(2, 3, 7, 4))


@pytest.mark.parametrize("fused", [False, True], ids=["chunked-forward", "fused-forward"])
def test_bf16_training_through_a_flowpp_block_matches_float64_gradients(monkeypatch, fused):
    """The chunked kernel under the blocks' selective recomputation (its output kept, the rest redone),
    its forward chunked or fused (the backward's recomputed scores then come from another kernel)."""
    import copy

    monkeypatch.setattr(attention_module, "fused_forward", lambda: fused)

    from flowspec.layers.networks import FlowppNetwork

    torch.manual_seed(0)
    net = FlowppNetwork((2, 4, 4), 6, filters=8, blocks=1, heads=2, attention=True, dropout=0.0)
    x = torch.randn(3, 2, 4, 4)
    grads = []
    for model, bf16 in ((copy.deepcopy(net).double(), False), (net, True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x.double() if not bf16 else x).double().square().sum().backward()
        grads.append(torch.cat([p.grad.double().flatten() for p in model.parameters()]))
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 0.05


def _plain_projection(x, weight, bias, padding, mask, scale):
    u = F.elu(torch.cat([x, -x], -1))
    u = u if mask is None else u * mask * scale
    if padding is None:
        return F.linear(u, weight, bias)
    return F.conv2d(u.permute(0, 3, 1, 2), weight, bias, padding=padding).permute(0, 2, 3, 1)


@pytest.mark.parametrize("padding", [None, 0, 1], ids=["dense", "conv1x1", "conv3x3"])
@pytest.mark.parametrize("dropout", [False, True])
def test_a_layer_of_concat_elu_equals_the_composition_with_gradients_in_float64(padding, dropout):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64).requires_grad_()  # N x H x W x C
    kernel = [] if padding is None else [2 * padding + 1] * 2
    weight = torch.randn(6, 10, *kernel, generator=gen, dtype=torch.float64).requires_grad_()
    bias = torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_()
    mask = torch.rand(2, 4, 3, 10, generator=gen) < 0.7 if dropout else None
    args = (x, weight, bias, padding, mask, 1 / 0.7)
    mine, plain = project_concat_elu(*args), _plain_projection(*args)
    assert torch.allclose(mine, plain, atol=1e-12)
    grad = torch.randn_like(mine)
    inputs = (x, weight, bias)
    for got, want in zip(
        torch.autograd.grad(mine, inputs, grad), torch.autograd.grad(plain, inputs, grad), strict=True
    ):
        assert torch.allclose(got, want, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: project_concat_elu(*t, padding, mask, 1 / 0.7), inputs)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_layer_of_concat_elu_under_torch_compile_gives_the_eager_gradients(backend):
    """As for concat_elu: the compiled fused layer must keep every gradient (torch 2.11 lost some)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 10, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 4, 3, 10, generator=gen) < 0.7
    grad = torch.randn(2, 4, 3, 6, generator=gen, dtype=torch.float64)

    def loss(x, weight, bias):
        return (project_concat_elu(x, weight, bias, 1, mask, 1 / 0.7) * grad).sum()

    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    mine = torch.autograd.grad(compiled(x, weight, bias), (x, weight, bias))
    plain = torch.autograd.grad(loss(x, weight, bias), (x, weight, bias))
    for got, want in zip(mine, plain, strict=True):
        assert torch.allclose(got, want, atol=1e-12)
    torch._dynamo.reset()


def test_a_layer_of_concat_elu_keeps_only_its_input_and_mask_and_matches_bf16_autocast():
    """Plain autograd would also keep the 2x wider layer input; under autocast the result and the
    gradients are the ones the composed layers give, in the parameters' own dtype."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 4, 16, generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(32, 32, 3, 3, generator=gen).mul_(0.1).requires_grad_()
    bias = torch.randn(32, generator=gen).requires_grad_()
    mask = torch.rand(2, 8, 4, 32, generator=gen) < 0.8
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autocast("cpu", torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mine = project_concat_elu(x, weight, bias, 1, mask, 1.25)
    assert sorted(t.numel() for t in kept) == sorted([x.numel(), weight.numel(), mask.numel()])
    with torch.autocast("cpu", torch.bfloat16):
        plain = _plain_projection(x, weight, bias, 1, mask, 1.25)
    assert mine.dtype == plain.dtype == torch.bfloat16
    assert torch.allclose(mine.float(), plain.float(), atol=0.02, rtol=0.02)
    grad = torch.randn_like(mine)
    mine_grads = torch.autograd.grad(mine, (x, weight, bias), grad)
    plain_grads = torch.autograd.grad(plain, (x, weight, bias), grad)
    for got, want in zip(mine_grads, plain_grads, strict=True):
        assert got.dtype == want.dtype
        assert (got.float() - want.float()).norm() <= 0.02 * want.float().norm()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fused_chains_give_the_eager_values_and_gradients(backend):
    """What `--compile` compiles on a CPU (`fusion.Fusable`): a layer of concat_elu with and without its
    dropout mask, the gated residual and the mixture's logit-CDF, against their eager selves in float64
    (inductor generates its own C++ for them: a miscompiled gradient would show here)."""
    gen = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).mul_(2).requires_grad_()

    x, weight, bias = rand(2, 4, 3, 5), rand(6, 10), rand(6)
    mask = (torch.rand(2, 4, 3, 10, generator=gen) < 0.7).to(torch.uint8)
    y = rand(2, 4, 3, 10)
    b, logits, means, logscales = rand(2, 3, 4), rand(2, 3, 4, 5), rand(2, 3, 4, 5), rand(2, 3, 4, 5)
    chains = [
        (lambda fused: project_concat_elu(x, weight, bias, None, mask, 1 / 0.7, fused), (x, weight, bias)),
        (lambda fused: project_concat_elu(x, weight, bias, None, None, 1.0, fused), (x, weight, bias)),
        (lambda fused: gated_residual(x, y, fused=fused), (x, y)),
        (lambda fused: logit_cdf(b, logits, means, logscales, fused=fused), (b, logits, means, logscales)),
    ]
    for chain, inputs in chains:
        eager, compiled = chain(None), chain(backend)
        eager, compiled = (out if isinstance(out, tuple) else (out,) for out in (eager, compiled))
        grads = [torch.randn_like(t) for t in eager]
        for got, want in zip(compiled, eager, strict=True):
            assert torch.allclose(got, want, atol=1e-12)
        got = torch.autograd.grad(compiled, inputs, grads)
        want = torch.autograd.grad(eager, inputs, grads)
        for g, w in zip(got, want, strict=True):
            assert torch.allclose(g, w, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_fused_inverse_cdf_finds_the_eager_root(dtype):
    """With --compile the inverse CDF's work on N x K values is compiled once for any number of rows
    (the unsolved rows shrink from step to step): the roots it finds are the eager solver's, for sharp rows
    (solved in log space) too, and for a single row."""
    gen = torch.Generator().manual_seed(4)
    n, k = 300, 8
    logits, means = torch.randn(n, k, generator=gen), 2 * torch.randn(n, k, generator=gen)
    logscales = torch.randn(n, k, generator=gen).clamp(min=MIN_LOGSCALE)
    logscales[:20] = MIN_LOGSCALE  # sharp: far from the means the logit leaves the exponent range
    x = 3 * torch.randn(n, generator=gen)
    x[:20] = means[:20].amax(-1) + 1.5
    logits, means, logscales, x = (t.to(dtype) for t in (logits, means, logscales, x))
    h, _ = logit_cdf(x, logits, means, logscales)
    eager, steps = inverse_logit_cdf(h, logits, means, logscales)
    compiled, compiled_steps = inverse_logit_cdf(h, logits, means, logscales, fused="inductor")
    assert compiled.dtype == dtype and steps > 3 and abs(compiled_steps - steps) <= 1
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol)
    torch.testing.assert_close(compiled, x, rtol=tol, atol=tol)
    graphs = counters["stats"]["unique_graphs"]
    for rows in (slice(-1, None), slice(123)):  # no graph of its own for another number of rows, or one
        found, _ = inverse_logit_cdf(*(t[rows] for t in (h, logits, means, logscales)), fused="inductor")
        torch.testing.assert_close(found, eager[rows], rtol=tol, atol=tol)
    assert counters["stats"]["unique_graphs"] == graphs
