"""The fast kernels compute what the plain ones do: chunked-matmul attention (bf16 on the CPU) against the
fused kernel, concat_elu against elu(cat([x, -x])), in float64 with gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flowspec.layers import attention as attention_module
from flowspec.layers.attention import attention, chunked_attention
from flowspec.layers.networks import concat_elu


def test_concat_elu_is_elu_of_x_and_minus_x_with_exact_gradients():
    x = torch.randn(3, 4, 5, dtype=torch.float64).mul_(3)
    x[0, 0, :2] = 0.0  # the kink
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


def _qkv(b: int = 5, length: int = 7, d: int = 3, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, length, d, generator=gen, dtype=dtype, requires_grad=True) for _ in range(3)]


def test_chunked_attention_and_its_gradients_equal_the_fused_kernel_in_float64():
    q, k, v = _qkv()  # 5 slices: chunks of 4 and 1
    out = chunked_attention(q, k, v)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-12)
    assert torch.autograd.gradcheck(chunked_attention, (q, k, v))


def test_chunked_attention_is_a_well_formed_custom_op():
    torch.library.opcheck(chunked_attention, _qkv())


def test_bf16_on_the_cpu_takes_the_chunked_kernel_and_matches_float32(monkeypatch):
    calls = []

    def counted(*tensors):
        calls.append(1)
        return chunked_attention(*tensors)

    monkeypatch.setattr(attention_module, "chunked_attention", counted)
    q, k, v = (t.detach().view(2, 3, 7, 4).float() for t in _qkv(6, 7, 4))  # N x heads x L x d
    reference = F.scaled_dot_product_attention(q, k, v)
    out = attention(*(t.bfloat16() for t in (q, k, v)))
    assert calls == [1] and out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() < 0.05
    assert attention(q, k, v).equal(reference)  # float32: the fused kernel itself


def test_bf16_training_through_a_flowpp_block_matches_float64_gradients():
    """The chunked kernel under the blocks' selective recomputation (its output kept, the rest redone)."""
    import copy

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
