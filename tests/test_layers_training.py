"""Training-mode machinery: dropout masks and the Flow++ block's selective recomputation."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from flowspec.inspection.memory import _flowpp_block
from flowspec.layers.dropout import Dropout
from flowspec.layers.networks import FlowppBlock


def test_dropout_mask_keeps_the_right_fraction_and_rescales():
    drop = Dropout(0.2).train()
    x = torch.ones(1_000_000)
    y = drop(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.8, abs=0.002)  # 5 standard deviations
    assert torch.all(y[kept] == 1.25)


def test_dropout_masks_are_bytes_of_0_and_1_and_follow_the_seed():
    drop = Dropout(0.5).train()
    torch.manual_seed(3)
    a = drop.draw((3, 5, 7), torch.device("cpu"))  # an odd count: half an int64 of bits unused
    torch.manual_seed(3)
    b = drop.draw((3, 5, 7), torch.device("cpu"))
    assert a.dtype == torch.uint8 and a.shape == (3, 5, 7)
    assert set(a.unique().tolist()) == {0, 1}
    assert torch.equal(a, b)
    assert 0 < a.sum() < a.numel()


def test_dropout_off_in_eval_mode_and_at_zero_rate():
    x = torch.randn(3, 4)
    assert Dropout(0.3).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    assert Dropout(0.3).eval().draw(x.shape, x.device) is None


def test_dropout_gradient_is_the_mask_times_the_scale():
    drop = Dropout(0.25).train()
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    mask = drop.draw(x.shape, x.device)
    drop(x, mask).sum().backward()
    assert torch.equal(x.grad, mask.double() / 0.75)


@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("context_filters", [0, 3])
def test_flowpp_block_recomputation_gives_the_plain_gradients(attention, context_filters):
    """A training step (masks drawn before the block, selective recomputation in backward) gives the
    same output and gradients as the block computed plainly with the same masks."""
    torch.manual_seed(0)
    block = FlowppBlock(8, 2, attention, 0.3, context_filters).double().train()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))  # leave the identity-like init
    x = torch.randn(2, 4, 6, 8, dtype=torch.float64, requires_grad=True)
    pos_emb = torch.randn(4, 6, 8, dtype=torch.float64, requires_grad=True)
    context = torch.randn(2, 4, 6, context_filters, dtype=torch.float64) if context_filters else None
    params = [x, pos_emb, *block.parameters()]

    torch.manual_seed(1)
    out = block(x, pos_emb, context)
    grads = torch.autograd.grad((out * out.detach().cos()).sum(), params)

    torch.manual_seed(1)
    masks = (block.conv.dropout.draw((2, 4, 6, 16), "cpu"), block.attn.dropout.draw((2, 4, 6, 8), "cpu"))
    plain = block._block(x, pos_emb, context, masks)
    plain_grads = torch.autograd.grad((plain * plain.detach().cos()).sum(), params)

    assert torch.equal(out, plain)
    for g, h in zip(grads, plain_grads, strict=True):
        assert torch.allclose(g, h, rtol=1e-12, atol=1e-12)


def test_flowpp_block_keeps_masks_and_expensive_outputs_only():
    """What a training-mode block keeps for backward is its input's share: c1's output, the attention
    output and log-sum-exp, and the byte masks; nothing per position of the dense layers (3F, 2F, 2F)."""
    block = FlowppBlock(16, 4, True, 0.2, 0).train()
    x = torch.randn(2, 8, 4, 16, requires_grad=True)
    pos_emb = torch.zeros(8, 4, 16)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = block(x, pos_emb, None)
    held = sum(e.self_cpu_memory_usage for e in prof.events()) - out.numel() * 4
    positions = 2 * 8 * 4
    expected = _flowpp_block(block, 4) * positions - 16 * 4 * positions  # its input is x, made outside
    assert held == pytest.approx(expected, rel=0.02)
    assert held < 6 * 16 * 4 * positions  # a plain backward keeps about 20 F floats per position
