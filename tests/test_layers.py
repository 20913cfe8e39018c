"""Every layer kind in float64 at tiny shapes: exact inverse, log-det = log|det| of the autograd Jacobian,
forward and inverse log-dets cancel, the official channel orders, data-dependent init."""

from __future__ import annotations

import pytest
import torch
from model_helpers import flat, jacobian_logdet, perturb

from flowspec.layers import (
    Coupling,
    FactorOut,
    Flip,
    LogitPreprocess,
    Norm,
    Pointwise,
    Sequence,
    Sigmoid,
    Split,
    Squeeze,
    mixlogistic,
)
from flowspec.layers.networks import ContextNetwork, FlowppNetwork, ResNet
from flowspec.layers.splits import merge, split
from flowspec.layers.squeeze import squeeze
from flowspec.steps import KINDS

SHAPE = (2, 4, 4)  # C x H x W of a test image; halves are 2 x 4 x 2


pytestmark = pytest.mark.usefixtures("float64_seeded")


# the official launchers' network options (flowpp_gated: no attention sub-block, as in their dequantizers)
FLOWPP_OPTIONS = {
    "flowpp_gated": dict(mixer=False, final_elu=True),
    "flowpp_wn": dict(final_elu=True, weight_norm=True),
    "flowpp_plain": dict(layernorm=False, nin=False),
}


def _coupling(transform: str, network: str, context_filters: int = 0) -> Coupling:
    c, h, w = SHAPE[0], SHAPE[1], SHAPE[2] // 2
    per = {"additive": 1, "affine": 2, "mixlogistic": 2 + 3 * 3}[transform]
    if network.startswith("flowpp"):
        options = FLOWPP_OPTIONS.get(network, {})
        net = FlowppNetwork(
            (c, h, w), c * per, 8, 2, 2, network != "flowpp_nin", 0.0, context_filters, **options
        )
    else:
        net = ResNet(c, c * per, 8, 1, network.split("_")[1], context_filters)
    return Coupling(transform, net, 3)


def _split_layer(mask: str) -> Split:
    channels = SHAPE[0] // 2 if mask == "channel" else SHAPE[0]
    return Split(mask, Sequence([Pointwise(channels, 2)]))


PAIR_LAYERS = {
    "norm_element": lambda: Norm((2, 4, 2), 2, "element"),
    "norm_channel": lambda: Norm((2, 4, 2), 2, "channel"),
    "pointwise": lambda: Pointwise(2, 2),
    "flip": Flip,
    **{
        f"coupling_{t}_{n}": (lambda t=t, n=n: _coupling(t, n))
        for t in ("additive", "affine", "mixlogistic")
        for n in ("flowpp", "flowpp_nin", "resnet_batch", "resnet_weight")
    },
    **{f"coupling_mixlogistic_{n}": (lambda n=n: _coupling("mixlogistic", n)) for n in FLOWPP_OPTIONS},
}
TENSOR_LAYERS = {
    "norm_element_tensor": lambda: Norm(SHAPE, 1, "element"),
    "pointwise_tensor": lambda: Pointwise(2, 1),
    "sigmoid": Sigmoid,
    "squeeze": Squeeze,
    "factor_out": lambda: FactorOut((1, 4, 4)),
    "preprocess": lambda: LogitPreprocess(0.05, 256),
    **{f"split_{m}": (lambda m=m: _split_layer(m)) for m in ("stripe", "checkerboard", "channel")},
}


def _checked(kind: str) -> bool:
    """Whether the checks above build the layer of a step kind: an entry named KIND or KIND_VARIANT."""
    return any(name == kind or name.startswith(f"{kind}_") for name in (*PAIR_LAYERS, *TENSOR_LAYERS))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_step_kinds_layer_is_checked_in_float64(kind):
    """A new kind's layer gets the exactness checks below: add it to PAIR_LAYERS (it runs on the halves
    of a split) or TENSOR_LAYERS. A kind that copies its body (repeat) has no layer of its own."""
    assert KINDS[kind].copies is not None or _checked(kind), (
        f"add the {kind} layer to PAIR_LAYERS or TENSOR_LAYERS"
    )


def _input(name: str, n: int = 2) -> torch.Tensor:
    if name == "preprocess":
        return 256 * torch.rand(n, *SHAPE)
    return torch.randn(n, *SHAPE)


def _prepare(layer):
    perturb(layer)
    return layer.eval()


def _check(layer, forward, inverse, x):
    y, logdet = forward(x)
    assert logdet.shape == (x.shape[0],) and logdet.dtype == torch.float64
    assert (flat(inverse(y)) - flat(x)).abs().max() < 1e-8
    # log-det against the Jacobian, and the inverse's Jacobian cancels it
    x1 = x[:1]
    assert abs(jacobian_logdet(lambda t: forward(t)[0], x1) - logdet[0]) < 1e-6
    y1 = forward(x1)[0]
    y1_flat = flat(y1)

    def inverse_of_flat(t):
        if isinstance(y1, tuple):
            a, b = t.split([y1[0][0].numel(), y1[1][0].numel()], 1)
            return inverse((a.view_as(y1[0]), b.view_as(y1[1])))
        return inverse(t.view_as(y1))

    assert abs(jacobian_logdet(inverse_of_flat, y1_flat) + logdet[0]) < 1e-6


@pytest.mark.parametrize("name", sorted(PAIR_LAYERS))
def test_pair_layer_is_exact(name):
    layer = _prepare(PAIR_LAYERS[name]())
    _check(
        layer,
        lambda x: layer(split("stripe", x)),
        lambda y: merge("stripe", *layer.inverse(y)),
        _input(name),
    )


@pytest.mark.parametrize("name", sorted(TENSOR_LAYERS))
def test_tensor_layer_is_exact(name):
    layer = _prepare(TENSOR_LAYERS[name]())
    _check(layer, layer, layer.inverse, _input(name))


@pytest.mark.parametrize("network", ["flowpp", "flowpp_nin", "flowpp_gated", "flowpp_wn", "resnet_batch"])
def test_coupling_with_context_is_exact_and_uses_context(network):
    layer = _prepare(_coupling("mixlogistic", network, context_filters=3))
    context = torch.randn(2, 4, 2, 3)
    x = _input("coupling")
    _check(
        layer,
        lambda t: layer(split("stripe", t), context[: t.shape[0]]),
        lambda y: merge("stripe", *layer.inverse(y, context[: y[0].shape[0]])),
        x,
    )
    y0, _ = layer(split("stripe", x), context)
    y1, _ = layer(split("stripe", x), context + 1)
    assert not torch.allclose(y0[1], y1[1])


def test_coupling_transforms_only_the_second_half():
    layer = _prepare(_coupling("mixlogistic", "flowpp"))
    a, b = split("stripe", _input("c"))
    (a2, b2), _ = layer((a, b))
    assert torch.equal(a2, a) and not torch.allclose(b2, b)
    seen = []
    layer.network.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    layer((a, b + 1))
    layer((a, b - 1))  # the network sees only the first half: the same input, the same outputs
    assert all(torch.equal(given, a) for given, _ in seen) and torch.equal(seen[0][1], seen[1][1])


class _Outputs(torch.nn.Module):
    """A stand-in coupling network that gives fixed outputs, N x C*P x H x W."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, a, context=None):
        return self.out


@pytest.mark.parametrize("transform", ["affine", "mixlogistic"])
def test_the_coupling_reads_the_official_output_layout(transform):
    """Channel c's P outputs are at c*P + j: j = 0 the scale (through tanh), 1 the shift, then the
    mixture's k logits, k means and k log-scales."""
    k, (n, c, h, w) = 3, (2, 2, 3, 4)
    per = 2 if transform == "affine" else 2 + 3 * k
    out = torch.randn(n, c * per, h, w, dtype=torch.float64)
    layer = Coupling(transform, _Outputs(out), k)
    a, b = torch.randn(n, c, h, w, dtype=torch.float64), torch.randn(n, c, h, w, dtype=torch.float64)
    (_, y), _ = layer((a, b))
    params = out.view(n, c, per, h, w)
    s, t = torch.tanh(params[:, :, 0]), params[:, :, 1]
    g = b
    if transform == "mixlogistic":
        logits, means, logscales = (
            params[:, :, 2 + i * k : 2 + (i + 1) * k].movedim(2, -1) for i in range(3)
        )
        g, _ = mixlogistic.logit_cdf(b, logits, means, logscales)
    torch.testing.assert_close(y, g * torch.exp(s) + t)


def test_logit_preprocessing_maps_the_levels_into_alpha_to_one_minus_alpha():
    """logit(alpha + (1 - 2 alpha) v / levels): v = 0 to logit(alpha), v = levels to logit(1 - alpha)."""
    layer = LogitPreprocess(0.05, 256)
    z, _ = layer(torch.tensor([[0.0, 128.0, 256.0]], dtype=torch.float64))
    expected = torch.logit(torch.tensor([[0.05, 0.5, 0.95]], dtype=torch.float64))
    torch.testing.assert_close(z, expected)


def test_logit_preprocessing_stays_finite_at_the_top_level_for_any_alpha():
    """v = levels (a dequantized 255 + u that rounds up in float32) with a tiny alpha: 1 - y is computed
    as alpha + scale (levels - v), not by rounding y to 1 (which gave logit and log-det inf)."""
    for alpha in (1e-8, 1e-12):
        layer = LogitPreprocess(alpha, 256)
        z, logdet = layer(torch.tensor([256.0, 255.5, 0.0]).view(1, 1, 1, 3))
        assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
        assert z[0, 0, 0, 0] == pytest.approx(
            -z[0, 0, 0, 2].item(), rel=1e-5
        )  # logit(1 - alpha) = -logit(alpha)


def test_stripe_split_takes_even_and_odd_columns():
    x = torch.arange(2 * 4 * 4.0).view(1, 2, 4, 4)
    a, b = split("stripe", x)
    assert torch.equal(a, x[..., 0::2]) and torch.equal(b, x[..., 1::2])
    assert torch.equal(merge("stripe", a, b), x)


def test_checkerboard_split_alternates_by_row():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    a, b = split("checkerboard", x)
    parity = (torch.arange(4).view(4, 1) + torch.arange(4).view(1, 4)) % 2
    assert torch.equal(a.flatten(), x.flatten()[parity.flatten() == 0])
    assert torch.equal(b.flatten(), x.flatten()[parity.flatten() == 1])
    assert torch.equal(merge("checkerboard", a, b), x)


def test_channel_split_takes_first_and_last_channels():
    x = torch.randn(1, 6, 2, 2)
    a, b = split("channel", x)
    assert torch.equal(a, x[:, :3]) and torch.equal(b, x[:, 3:])


def test_squeeze_uses_tensorflow_space_to_depth_order():
    c = 3
    x = torch.randn(1, c, 4, 6)
    y = squeeze(x)
    for dy in range(2):
        for dx in range(2):
            for ch in range(c):
                assert torch.equal(y[0, (2 * dy + dx) * c + ch], x[0, ch, dy::2, dx::2])


def test_norm_data_dependent_init_normalises_once():
    layer = Norm((2, 4, 2), 2, "element")
    layer.init_mode = True
    a, b = 3 + 2 * torch.randn(64, 2, 4, 2), torch.randn(64, 2, 4, 2)
    (ya, yb), logdet = layer((a, b))
    for y in (ya, yb):
        assert y.mean(0).abs().max() < 1e-8 and (y.std(0, correction=0) - 1).abs().max() < 1e-6
    assert bool(layer.initialized)
    g = layer.g.clone()
    layer((a * 5, b))  # initialised: no second init
    assert torch.equal(layer.g, g)
    assert torch.allclose(logdet, torch.log(layer.g).sum().expand(64))


def test_norm_clamps_its_scale():
    layer = Norm((1, 1, 1), 1)
    with torch.no_grad():
        layer.g.fill_(-1.0)
    _, logdet = layer(torch.ones(2, 1, 1, 1))
    assert torch.allclose(logdet, torch.full((2,), torch.log(torch.tensor(1e-10)).item()))


def test_pointwise_init_and_logdet_in_float64():
    torch.set_default_dtype(torch.float32)
    layer = Pointwise(3, 2)
    assert layer.weight.shape == (2, 3, 3)
    assert (layer.weight - torch.eye(3)).abs().max() < 0.01
    x = torch.randn(2, 3, 5, 4)
    y, logdet = layer((x, x))
    assert torch.allclose(y[0], torch.einsum("nchw,cd->ndhw", x, layer.weight[0]))
    with torch.no_grad():  # condition number 1e6: a float32 slogdet is off in the first decimals
        rotation, _ = torch.linalg.qr(
            torch.randn(2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        )
        layer.weight.copy_(rotation * torch.tensor([1e3, 1.0, 1e-3], dtype=torch.float64) @ rotation.mT)
    _, logdet = layer((x, x))
    expected = (20 * torch.linalg.slogdet(layer.weight.double())[1].sum()).float()
    assert logdet.dtype == torch.float32 and torch.equal(logdet, expected.expand(2))


def test_flowpp_network_official_shapes_and_init():
    net = FlowppNetwork((3, 8, 4), 3 * 11, 16, 2, 4, True, 0.0)
    assert net.pos_emb.shape == (8, 4, 16) and abs(net.pos_emb.std().item() - 0.01) < 0.003
    assert net.proj_in.weight.shape == (16, 3, 3, 3) and net.proj_out.weight.shape == (33, 16, 3, 3)
    block = net.blocks[0]
    assert block.conv.c1.weight.shape == (16, 32, 3, 3) and block.conv.c2.weight.shape == (32, 32)
    assert block.attn.proj1.weight.shape == (48, 16) and block.attn.proj2.weight.shape == (32, 16)
    assert abs(net.proj_in.weight.std().item() - 0.05) < 0.01
    for m in net.modules():
        if hasattr(m, "init_mode"):
            m.init_mode = True
    out = net(torch.randn(64, 3, 8, 4)).detach()
    # proj_out is data-initialised to std 0.1, mean 0 per output channel
    std, mean = torch.std_mean(out.transpose(0, 1).flatten(1), dim=1, correction=0)
    assert (std - 0.1).abs().max() < 1e-6 and mean.abs().max() < 1e-8


def test_context_network_shape():
    net = ContextNetwork(3, 8, 3, "stripe", 256, 0.0)
    assert net.proj.weight.shape == (8, 6, 3, 3) and net.blocks[0].c2.weight.shape == (16, 16, 3, 3)
    out = net(torch.randint(0, 256, (2, 3, 4, 6)).double())
    assert out.shape == (2, 4, 3, 8)
