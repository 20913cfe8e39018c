"""The Flow++ coupling and context networks against the official formulas (flows.py's gated_conv,
gated_attn, layernorm, concat_elu, the data-dependent init of conv2d and nin; abl_noattn's gated_nin),
written out here op by op in float64: the invertibility, log-det and parameter-count tests pass for many
networks that are not Flow++'s (heads merged wrongly, LayerNorm before the block, dropout elsewhere)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from model_helpers import perturb

from flowspec.layers.networks import ContextNetwork, FlowppNetwork

pytestmark = pytest.mark.usefixtures("float64_seeded")


def _celu(x):  # official concat_elu: elu(concat([x, -x], axis=-1))
    return F.elu(torch.cat([x, -x], -1))


def _conv(m, x):  # official conv2d, NHWC, SAME padding
    w = m.effective_weight()
    return F.conv2d(x.permute(0, 3, 1, 2), w, m.bias, padding=w.shape[-1] // 2).permute(0, 2, 3, 1)


def _nin(m, x):
    return x @ m.effective_weight().T + m.bias


def _gate(c):
    a, b = c.chunk(2, -1)
    return a * torch.sigmoid(b)


def _ln(m, x):  # official layernorm, e = 1e-5
    u = x.mean(-1, keepdim=True)
    s = (x - u).square().mean(-1, keepdim=True)
    return (x - u) * torch.rsqrt(s + 1e-5) * m.weight + m.bias


def _gated_conv(g, x, a=None, mask=None, p=0.0):
    c1 = (_conv if g.c1.weight.dim() == 4 else _nin)(g.c1, _celu(x))
    if a is not None:
        c1 = c1 + _nin(g.a_proj, _celu(a))
    c1 = _celu(c1)
    if mask is not None:
        c1 = c1 * mask / (1 - p)
    c2 = (_conv if g.c2.weight.dim() == 4 else _nin)(g.c2, c1)
    return x + _gate(c2)


def _gated_attn(m, x, pos_emb, heads, mask=None, p=0.0):
    bs, h, w, ch = x.shape
    t, dim = h * w, ch // heads
    c = _nin(m.proj1, x + pos_emb[None])
    c = c.reshape(bs, t, 3, heads, dim).permute(2, 0, 3, 1, 4)
    q, k, v = c.unbind(0)
    wt = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim), -1)
    a = (wt @ v).permute(0, 2, 1, 3).reshape(bs, h, w, ch)
    if mask is not None:
        a = a * mask / (1 - p)
    return x + _gate(_nin(m.proj2, a))


def _official_network(net, x, context, heads):
    h = _conv(net.proj_in, x.permute(0, 2, 3, 1))
    for b in net.blocks:
        h = _ln(b.ln1, _gated_conv(b.conv, h, context))
        if b.attn is not None:
            h = _ln(b.ln2, _gated_attn(b.attn, h, net.pos_emb, heads))
    h = _conv(net.proj_out, _celu(h) if net.final_elu else h)
    return h.permute(0, 3, 1, 2)


@pytest.mark.parametrize("cf", [0, 3])
@pytest.mark.parametrize("options", [{}, dict(final_elu=True, weight_norm=True), dict(mixer=False)])
def test_flowpp_network_is_the_official_formula(cf, options):
    heads = 2
    net = FlowppNetwork((2, 4, 6), 2 * 5, 8, 2, heads, True, 0.0, cf, **options)
    perturb(net, 0.3)  # LayerNorm gains/biases away from 1/0, gates away from 1/2
    net.eval()
    x = torch.randn(3, 2, 4, 6)
    context = torch.randn(3, 4, 6, cf) if cf else None
    torch.testing.assert_close(
        net(x, context), _official_network(net, x, context, heads), rtol=1e-10, atol=1e-10
    )


def test_flowpp_block_dropout_is_where_and_as_much_as_the_official():
    """In training mode, with the masks drawn by the block: concat_elu(c1) and the attention output are
    dropped and rescaled by 1 / (1 - p), as the official tf.nn.dropout."""
    p, heads = 0.25, 2
    net = FlowppNetwork((2, 4, 6), 10, 8, 1, heads, True, p)
    perturb(net, 0.3)
    block, pos = net.blocks[0], net.pos_emb
    block.recompute = False
    x = torch.randn(3, 4, 6, 8)
    drawn = []
    for d in (block.conv.dropout, block.attn.dropout):
        orig = d.draw
        d.draw = lambda shape, device, orig=orig: drawn.append(orig(shape, device)) or drawn[-1]
    y = block(x, pos, None)
    m1, m2 = drawn
    assert m1.shape == (3, 4, 6, 16) and m2.shape == (3, 4, 6, 8)
    assert 0.6 < m1.double().mean() < 0.9  # keep 1 - p
    h = _ln(block.ln1, _gated_conv(block.conv, x, None, m1, p))
    ref = _ln(block.ln2, _gated_attn(block.attn, h, pos, heads, m2, p))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_every_dense_and_conv_is_data_initialised_to_the_official_scale():
    """The official init: each conv/nin output (before bias) has mean 0 and std init_scale per unit over
    the init batch, init_scale 0.1 for gated_conv's c2, gated_attn's proj2 and proj_out, else 1."""
    net = FlowppNetwork((2, 4, 6), 10, 8, 2, 2, True, 0.0, 3)
    outs = {}
    for name, m in net.named_modules():
        if hasattr(m, "init_mode"):
            m.init_mode = True
            m.register_forward_hook(lambda mod, a, out, name=name: outs.setdefault(name, out.detach()))
    net(torch.randn(64, 2, 4, 6), torch.randn(64, 4, 6, 3))
    assert len(outs) == 2 + 2 * 5
    for name, out in outs.items():
        std, mean = torch.std_mean(out.reshape(-1, out.shape[-1]), 0, correction=0)
        want = 0.1 if name.split(".")[-1] in ("c2", "proj2", "proj_out") else 1.0
        assert (std - want).abs().max() < 1e-4 and mean.abs().max() < 1e-8, name


def _official_context(net, x, levels):
    from flowspec.layers.splits import split

    a, b = split("stripe", x / levels - 0.5)
    h = _conv(net.proj, torch.cat([a, b], 1).permute(0, 2, 3, 1))
    for g in net.blocks:
        h = _gated_conv(g, h)
    return h


@pytest.mark.parametrize("levels", [256, 32])
def test_context_network_is_the_official_shallow_processor(levels):
    net = ContextNetwork(3, 8, 3, "stripe", levels, 0.2)
    perturb(net, 0.3)
    net.eval()
    x = torch.randint(0, levels, (2, 3, 4, 6)).double()
    torch.testing.assert_close(net(x), _official_context(net, x, levels), rtol=1e-10, atol=1e-10)


def _gated_nin(m, x, pos_emb):  # official abl_noattn.gated_nin
    bs, h, w, ch = x.shape
    c = _nin(m.proj1, x + pos_emb[None]).reshape(bs, h, w, ch, 3).amax(-1)
    return x + _gate(_nin(m.proj2, c))


def test_gated_nin_ablation_is_the_official_formula():
    net = FlowppNetwork((2, 4, 6), 10, 8, 2, 2, False, 0.0)
    perturb(net, 0.3)
    net.eval()
    x = torch.randn(3, 2, 4, 6)
    h = _conv(net.proj_in, x.permute(0, 2, 3, 1))
    for b in net.blocks:
        h = _ln(b.ln2, _gated_nin(b.attn, _ln(b.ln1, _gated_conv(b.conv, h)), net.pos_emb))
    ref = _conv(net.proj_out, h).permute(0, 3, 1, 2)
    torch.testing.assert_close(net(x), ref, rtol=1e-10, atol=1e-10)


def test_pointwise_and_position_embedding_init_distributions():
    from flowspec.layers import Pointwise
    from flowspec.layers.networks import position_embedding

    noise = Pointwise(64, 2).weight - torch.eye(64)  # official: eye + 0.001 randn
    assert abs(noise.mean().item()) < 3e-5 and abs(noise.std().item() / 0.001 - 1) < 0.03
    emb = position_embedding(32, 32, 96)  # official: N(0, 0.01)
    assert abs(emb.std().item() / 0.01 - 1) < 0.01
