"""Each spec setting reaches the module it names (heads, dropout, the preprocess's alpha and levels), and
the layers that change no parameter count do what they say (uniform noise, factor-out's halves, a ResNet
coupling that starts as the identity, dropout's keep rate when compiled)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SPECS

import flowspec
from flowspec.layers import FactorOut, UniformDequantizer
from flowspec.layers.dropout import Dropout
from flowspec.layers.networks import ContextNetwork, GatedAttention


def test_flowpp_cifar_settings_reach_every_module():
    model = flowspec.build(flowspec.load_spec(SPECS / "flowpp_cifar.flow"), "meta")
    attn = [m for m in model.modules() if isinstance(m, GatedAttention)]
    assert len(attn) == (4 + 2 + 3) * 10 + 4 * 2 and all(m.heads == 4 for m in attn)
    drops = [m for m in model.modules() if isinstance(m, Dropout)]
    assert drops and all(
        m.p == 0.2 for m in drops
    )  # the couplings' and the context network's (official dropout_p)
    ctx = model.dequantizer.context_net
    assert isinstance(ctx, ContextNetwork) and all(b.dropout.p == 0.2 for b in ctx.blocks)
    assert (model.preprocess.alpha, model.preprocess.levels) == (0.05, 256)


@pytest.mark.parametrize(("alpha", "levels"), [(0.01, 256), (0.05, 32)])
def test_preprocess_follows_the_spec(alpha, levels):
    spec = flowspec.load_spec(
        SPECS / "flowpp_cifar.flow", overrides=(f"preprocess.alpha={alpha}", f"data.levels={levels}")
    )
    pre = flowspec.build(spec, "meta").preprocess
    assert (
        pre.alpha == alpha and pre.levels == levels and pre.scale == pytest.approx((1 - 2 * alpha) / levels)
    )


def test_uniform_dequantizer_noise_is_uniform_on_0_1():
    torch.manual_seed(0)
    x = torch.zeros(20000, 1, 1, 1)
    v, log_q = UniformDequantizer()(x)
    u = v - x
    assert (u >= 0).all() and (u < 1).all() and torch.equal(log_q, torch.zeros(20000))
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003


def test_variational_dequantizer_feeds_the_context_of_x_to_its_flow():
    torch.manual_seed(0)
    from model_helpers import perturb, tiny_spec

    model = flowspec.build(tiny_spec("flowpp_cifar.flow")).double().eval()
    perturb(model)
    deq = model.dequantizer
    x = torch.randint(0, 256, (2, *model.spec.data.shape)).double()
    eps = torch.randn_like(x)
    u, log_q = deq.noise(eps, x)
    u_ref, logdet = deq.flow(eps, deq.context_net(x))
    torch.testing.assert_close(u, u_ref)
    log_n = -0.5 * eps.square().flatten(1).sum(1) - 0.5 * math.log(2 * math.pi) * eps[0].numel()
    torch.testing.assert_close(log_q, log_n - logdet)


def test_factor_out_keeps_the_first_half_of_the_channels():
    x = torch.randn(2, 4, 3, 3)
    (kept, factored), _ = FactorOut((2, 3, 3))(x)
    assert torch.equal(kept, x[:, :2]) and torch.equal(factored, x[:, 2:])


def test_dropout_keeps_1_minus_p_also_under_torch_compile():
    d = Dropout(0.2).train()
    eager = d.draw((400, 500), "cpu").double().mean().item()
    compiled = torch.compile(lambda: d.draw((400, 500), "cpu"), backend="eager", fullgraph=True)()
    assert abs(eager - 0.8) < 0.005 and abs(compiled.double().mean().item() - 0.8) < 0.005


@pytest.mark.parametrize("norm", ["batch", "weight"])
def test_resnet_coupling_network_starts_at_zero_and_its_blocks_are_residual(norm):
    from flowspec.layers.networks import ResBlock, ResNet

    torch.manual_seed(0)
    net = ResNet(2, 6, 8, 2, norm).eval()
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(net(x), torch.zeros(3, 6, 4, 4))  # the coupling starts as the identity
    block = ResBlock(8, norm).eval()
    h = torch.randn(3, 8, 4, 4)
    torch.testing.assert_close(block(h), h + block.net(h))
