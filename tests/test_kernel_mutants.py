"""Tests from a mutation audit of the fast kernels and the small layers (flowspec/layers: mixlogistic's
log-sigmoids, logit-CDF and probability-space CDF, concat_elu and its fused layer, the chunked attention,
dropout, the parameter-free layers of elementwise.py, fusion's `Fusable`): each test here failed on a
mutant of the code that every other test passed (a float64 gradient computed in float32, float64 cast to
bf16 or float32 kept under a bf16 autocast, a chunk of scores sized past its input, the chunked attention
taken off the CPU, a compiled dropout mask keeping p, a gradient cut by a compiled chain, dynamo's
recompile limit lowered). Tiny tensors, float64 where exactness is checked."""

from __future__ import annotations

import pytest
import torch

from flowspec.layers import attention as attention_module
from flowspec.layers import fusion, mixlogistic
from flowspec.layers.concat_elu import project_concat_elu
from flowspec.layers.dropout import Dropout

F64 = torch.float64

# ---------------------------------------------------------------- mixture of logistics


def test_the_log_sigmoids_backward_keeps_float64():
    """The derivative of the shared log-sigmoids is float64-exact for float64 z (a mutant saved z in
    float32 for backward: gradients off by ~1e-8, which the 1e-5 relative tolerance elsewhere let pass)."""
    z = torch.linspace(-30, 30, 121, dtype=F64).requires_grad_()
    weights = torch.randn(3, z.numel(), dtype=F64, generator=torch.Generator().manual_seed(0))
    (got,) = torch.autograd.grad(
        sum((w * t).sum() for w, t in zip(weights, mixlogistic._LogSigmoids.apply(z), strict=True)), z
    )
    s = torch.sigmoid(z.detach())
    want = weights[0] * (1 - s) - weights[1] * s + weights[2] * s
    assert torch.allclose(got, want, rtol=1e-13, atol=1e-300)


# ---------------------------------------------------------------- concat_elu and its fused layer


@pytest.mark.parametrize("padding", [None, 1], ids=["dense", "conv3x3"])
def test_a_layer_of_concat_elu_stays_float64_under_bf16_autocast(padding):
    """Autocast leaves float64 alone, and so does the fused layer: its output and gradients under a bf16
    autocast are the float64 ones (a mutant cast float64 to bf16 there too: errors of ~1e-2)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 3, 4, generator=gen, dtype=F64).requires_grad_()
    kernel = [] if padding is None else [3, 3]
    weight = torch.randn(5, 8, *kernel, generator=gen, dtype=F64).requires_grad_()
    bias = torch.randn(5, generator=gen, dtype=F64).requires_grad_()
    plain = project_concat_elu(x, weight, bias, padding)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine = project_concat_elu(x, weight, bias, padding)
    assert mine.dtype == F64 and torch.allclose(mine, plain, rtol=1e-13, atol=1e-13)
    grad = torch.randn(mine.shape, generator=gen, dtype=F64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.autograd.grad(mine, (x, weight, bias), grad)
    for g, want in zip(got, torch.autograd.grad(plain, (x, weight, bias), grad), strict=True):
        assert g.dtype == F64 and torch.allclose(g, want, rtol=1e-13, atol=1e-13)


def test_a_layer_of_concat_elu_on_a_float32_input_keeps_it_in_bf16_under_autocast():
    """Under a bf16 autocast a float32 input is cast as the layer would cast it: the layer keeps x and its
    weight in bf16 for backward (a mutant computed in the input's dtype: the same bf16 output, as the conv
    casts anyway, but x kept at twice the bytes and the backward pass in float32)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 3, 4, generator=gen, requires_grad=True)
    weight = torch.randn(5, 8, 3, 3, generator=gen, requires_grad=True)
    bias = torch.randn(5, generator=gen, requires_grad=True)
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        mine = project_concat_elu(x, weight, bias, 1)
    assert mine.dtype == torch.bfloat16
    assert [t.dtype for t in kept] == [torch.bfloat16, torch.bfloat16]  # x and the weight (no mask)
    grads = torch.autograd.grad(mine.float().sum(), (x, weight, bias))
    assert [g.dtype for g in grads] == [torch.float32] * 3


# ---------------------------------------------------------------- chunked attention


def test_a_chunk_of_attention_scores_is_no_larger_than_its_input_or_the_cache_share():
    """The score buffers hold min(pairs, SCORES / L^2) (image, head) pairs: 3 pairs of 8 positions take
    3, not the 16,384 the share would allow (two buffers of 4 MB each for 384 scores), and 64 pairs of
    512 positions take 4 (SCORES / 512^2), not 64 (SCORES / 512)."""
    assert attention_module._chunk(3, 8) == 3
    assert attention_module._chunk(64, 512) == 4
    assert attention_module._chunk(64, 2048) == 1
    scores, p, chunk = attention_module._score_buffers(torch.zeros(3, 8, 2, dtype=torch.bfloat16))
    assert chunk == 3 and scores.shape == p.shape == (3, 8, 8)


def test_only_bf16_on_the_cpu_takes_the_chunked_attention():
    """The chunked kernel is for bf16 on the CPU alone: float32 takes torch's fused kernel, and so does
    bf16 on any other device (meta stands for one here)."""
    assert attention_module.use_chunked(torch.zeros(1, dtype=torch.bfloat16))
    assert not attention_module.use_chunked(torch.zeros(1, dtype=torch.float32))
    assert not attention_module.use_chunked(torch.zeros(1, dtype=torch.bfloat16, device="meta"))


# ---------------------------------------------------------------- dropout


def test_a_dropout_mask_drawn_in_compiled_code_keeps_1_minus_p(monkeypatch):
    """Compiled code draws the mask from 31-bit draws (in-place `random_` would break its graph): the mask
    keeps a share 1 - p of the elements (a mutant kept p, which p = 0.5, the rate of the compiled-block
    tests, cannot tell apart). The compiled branch is taken here without compiling."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(0)
    mask = Dropout(0.2).train().draw((64, 64), "cpu")
    assert mask.dtype == torch.uint8 and set(mask.unique().tolist()) == {0, 1}
    assert abs(mask.float().mean().item() - 0.8) < 0.03  # 4096 draws: a standard deviation of 0.006


# ---------------------------------------------------------------- Fusable


def _counting_backend() -> tuple[object, list]:
    """A torch.compile backend that runs each graph eager and records it."""
    graphs: list = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    return backend, graphs


def test_a_fusable_of_any_shape_keeps_the_gradient_of_what_needs_one():
    """Only tensors that need no gradient are detached before the compiled call (a mutant detached every
    tensor: the gradient was lost, silently, with `fused` set)."""
    backend, _ = _counting_backend()

    def product(a, b):
        return a * b

    fused = fusion.any_shape(product)
    a, b = torch.randn(4, requires_grad=True), torch.randn(4)
    fused(a, b, fused=backend).sum().backward()
    assert torch.equal(a.grad, b)


def test_allow_recompiles_never_lowers_dynamos_limit():
    """(dynamo's own `patch` restores the limit: monkeypatch's undo deletes a config module's setting.)"""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch(name, 50):
        fusion.allow_recompiles(20)
        assert getattr(config, name) == 50
        fusion.allow_recompiles(80)
        assert getattr(config, name) == 80
    assert hasattr(config, name)
