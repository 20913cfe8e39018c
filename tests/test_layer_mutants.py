"""Behaviours of the layers, the step kinds and the builder that a mutation audit found unguarded: each
test here failed on a mutant of the code (an init scale or a starting value changed, a parameter cut off
from its gradient, a spec setting no longer reaching its module, a precision rule dropped) that every
other test passed. The float64 inverse and log-det checks and the op-by-op official formulas cannot see
these: the mutants stay exact bijections with the right log-dets, and most keep the formulas too."""

from __future__ import annotations

import pytest
import torch
from model_helpers import perturb, variational_spec
from torch.utils._python_dispatch import TorchDispatchMode

import flowspec
from flowspec.layers import Coupling, mixlogistic
from flowspec.layers.base import standard_normal_log_prob, sum_per_sample, zero_logdet
from flowspec.layers.dropout import Dropout
from flowspec.layers.fusion import Fusable
from flowspec.layers.mixlogistic import logit_cdf
from flowspec.layers.networks import Conv, Dense, FlowppBlock, FlowppNetwork, GatedConv, GatedNIN
from flowspec.layers.preprocess import LogitPreprocess


def _init_outputs(net: torch.nn.Module, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output of every dense and conv layer of `net` during its data-dependent init over `inputs`."""
    outs: dict[str, torch.Tensor] = {}
    for name, m in net.named_modules():
        if hasattr(m, "init_mode"):
            m.init_mode = True
            m.register_forward_hook(lambda mod, a, out, name=name: outs.setdefault(name, out.detach()))
    net(*inputs)
    return outs


@pytest.mark.parametrize(
    "options",
    [dict(attention=False), dict(final_elu=True, nin=False), dict(weight_norm=True), dict(mixer=False)],
    ids=["nin", "final_elu_3x3", "weight_norm", "gated"],
)
def test_every_variant_of_the_flowpp_network_is_data_initialised_to_the_official_scale(options):
    """The gated-NIN ablation's proj2, proj_out after a final concat_elu, a 3x3 second conv and weight-
    normalised layers start at init scale 0.1 (gates, proj_out) and 1 (the rest), as the attention network
    does (a mutant gave GatedNIN's proj2 init scale 1)."""
    attention = options.pop("attention", True)
    net = FlowppNetwork((2, 4, 6), 10, 8, 2, 2, attention, 0.0, 3, **options).double()
    outs = _init_outputs(net, torch.randn(64, 2, 4, 6).double(), torch.randn(64, 4, 6, 3).double())
    assert len(outs) >= 2 + 2 * 3
    for name, out in outs.items():
        std, mean = torch.std_mean(out.reshape(-1, out.shape[-1]), 0, correction=0)
        want = 0.1 if name.split(".")[-1] in ("c2", "proj2", "proj_out") else 1.0
        assert (std - want).abs().max() < 1e-4 and mean.abs().max() < 1e-8, name


def test_weight_norm_gains_start_at_1():
    """With `weight_norm=on` each layer's gain g starts at 1 (README: "g starts at 1"), so an
    uninitialised layer's weight is its direction v / |v| (a mutant started g at 2)."""
    for layer in (Dense(3, 5, weight_norm=True), Conv(3, 5, 3, weight_norm=True)):
        assert torch.equal(layer.gain.detach(), torch.ones(5))
        norms = layer.effective_weight().detach().flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(5))


def test_the_position_embedding_is_learned():
    """The Flow++ network's position embedding gets a gradient in training (a mutant detached it: the
    network still ran, the embedding stayed at its N(0, 0.01) draw)."""
    net = FlowppNetwork((2, 4, 4), 6, 4, 1, 2, True, 0.0).train()
    net(torch.randn(2, 2, 4, 4)).square().sum().backward()
    assert net.pos_emb.grad is not None and net.pos_emb.grad.abs().sum() > 0


@pytest.mark.parametrize("mask", ["checkerboard", "stripe"])
def test_the_context_networks_attention_runs_on_the_half_width_it_sees(mask):
    """The context network's position embedding is H x W/2 for a checkerboard or stripe mask (its
    input is the two halves concatenated on channels), and the dequantizer then runs (a mutant made it
    H x W: the model built and counted, then failed on its first image)."""
    torch.manual_seed(0)
    context = "filters=4, blocks=1, layernorm=on, attention=on, heads=2"
    model = flowspec.build(variational_spec(context, mask))
    assert model.dequantizer.context_net.pos_emb.shape == (8, 4, 4)
    x = torch.randint(0, 17, (4, 1, 8, 8))
    model.initialize(x)
    with torch.no_grad():
        assert torch.isfinite(model.log_prob(x)).all()


class _CountOps(TorchDispatchMode):
    """Counts the aten ops run under it."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_a_recomputing_block_keeps_its_convolutions_and_attention_for_backward():
    """The selective recomputation keeps the outputs of the convolutions and the attention kernel: the
    backward pass reruns the dense layers, not them (a mutant recomputed everything: the same gradients
    at a higher cost)."""
    block = FlowppBlock(4, 2, True, 0.0, 0, second_kernel=3).train()
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    pos = torch.zeros(4, 4, 4)
    with _CountOps() as forward:
        y = block(x, pos, None)
    with _CountOps() as backward:
        y.square().sum().backward()
    assert forward.counts["aten.convolution"] == 2
    assert "aten.convolution" not in backward.counts
    assert not [op for op in backward.counts if "scaled_dot_product" in op and "backward" not in op]
    assert backward.counts.get("aten.addmm", 0) + backward.counts.get("aten.mm", 0) > 0  # dense rerun


@pytest.mark.parametrize("transform", ["affine", "mixlogistic"])
def test_under_bf16_autocast_a_coupling_transforms_in_float32(transform):
    """Only the network runs in bf16: its outputs are cast to the data's float32 before tanh, exp and
    the mixture's maths (a mutant kept them bf16: y and the log-det lost all but 8 bits)."""
    torch.manual_seed(0)
    net = FlowppNetwork((2, 4, 4), 2 * (2 if transform == "affine" else 2 + 3 * 2), 4, 1, 2, True, 0.0)
    layer = Coupling(transform, net, 2)
    perturb(layer, 0.3)
    layer.autocast_dtype = torch.bfloat16
    a, b = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    with torch.no_grad():
        (_, y), logdet = layer((a, b))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(a)
        p = out.float().unflatten(1, (2, layer.per_element)).permute(0, 1, 3, 4, 2)
        s, t = torch.tanh(p[..., 0]), p[..., 1]
        if transform == "affine":
            want, want_logdet = b * torch.exp(s) + t, s.flatten(1).sum(1)
        else:
            g, log_slope = logit_cdf(b, p[..., 2:4], p[..., 4:6], p[..., 6:8])
            want, want_logdet = g * torch.exp(s) + t, (log_slope + s).flatten(1).sum(1)
    assert y.dtype == logdet.dtype == torch.float32
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logdet, want_logdet, rtol=1e-5, atol=1e-4)


def _mixlogistic_coupling() -> Coupling:
    torch.manual_seed(0)
    layer = Coupling("mixlogistic", FlowppNetwork((1, 4, 4), 1 * (2 + 3 * 2), 4, 1, 2, True, 0.0), 2)
    perturb(layer, 0.3)
    return layer


def test_a_mixture_couplings_fused_backend_reaches_its_logit_cdf_and_its_inverse(monkeypatch):
    """`fused` (set by `fuse_elementwise`) reaches the mixture's logit-CDF in training and eval and its
    inverse (a mutant passed None: `--compile` on a CPU silently left the mixture eager)."""
    seen = []

    def spy(fn):
        def wrapped(*args, fused=None, **kwargs):
            seen.append((fn.__name__, fused))
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(mixlogistic, "logit_cdf", spy(mixlogistic.logit_cdf))
    monkeypatch.setattr(mixlogistic, "inverse_logit_cdf", spy(mixlogistic.inverse_logit_cdf))
    layer = _mixlogistic_coupling()
    layer.fused = "a backend"
    a, b = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    layer.train()((a, b))[1].sum().backward()
    with torch.no_grad():
        y, _ = layer.eval()((a, b))
        layer.inverse(y)
    assert seen[0] == ("logit_cdf", "a backend") and seen[-1] == ("inverse_logit_cdf", "a backend")
    assert all(fused == "a backend" for _, fused in seen) and len(seen) >= 4


def test_a_mixture_coupling_recomputes_its_logit_cdf_in_the_backward_pass():
    """In training a mixture coupling keeps only the logit-CDF's inputs and recomputes it for backward
    (README: "The couplings recompute their mixture maths"); a mutant kept its N x K intermediates."""
    layer = _mixlogistic_coupling().train()
    (_, y), logdet = layer((torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)))
    with _CountOps() as backward:
        (y.sum() + logdet.sum()).backward()
    assert backward.counts.get("aten.logsumexp", 0) >= 3


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float64, 1e-10)])
def test_the_inverse_cdf_stops_at_its_documented_tolerance(dtype, tol):
    """By default the inverse stops at a relative step of 1e-6 in float32 and 1e-10 in float64 (README);
    Newton's quadratic convergence hid a mutant's 1e-4 or 1e-7 from the accuracy tests, but not from
    the same solve with the tolerance given."""
    g = torch.Generator().manual_seed(0)
    logits, means = torch.randn(500, 4, generator=g), 3 * torch.randn(500, 4, generator=g)
    logscales, h = torch.randn(500, 4, generator=g) - 1, 4 * torch.randn(500, generator=g)
    args = [t.to(dtype) for t in (h, logits, means, logscales)]
    x, iterations = mixlogistic.inverse_logit_cdf(*args)
    x_tol, iterations_tol = mixlogistic.inverse_logit_cdf(*args, tol=tol)
    assert torch.equal(x, x_tol) and iterations == iterations_tol


def test_under_bf16_autocast_only_the_dequantizers_context_network_runs_in_bf16():
    """The variational dequantizer runs its context network under autocast and its flow outside it (its
    couplings' networks have their own): a mutant ran the whole flow under autocast, so its 1x1 convs'
    matmuls went bf16 and u and log q lost precision."""
    spec = flowspec.parse_spec(
        """model t
data digits { shape 1x8x8  levels 17 }
dequantize variational {
  context(filters=4, blocks=1)
  split checkerboard { pointwise; coupling affine(filters=4, blocks=1, heads=2); pointwise }
  sigmoid
}
flow { split checkerboard { coupling affine(filters=4, blocks=1, heads=2) } }
prior normal
"""
    )
    torch.manual_seed(0)
    model = flowspec.build(spec)
    x = torch.randint(0, 17, (4, 1, 8, 8))
    model.initialize(x)
    perturb(model, 0.3)
    model.eval().set_autocast(torch.bfloat16)
    deq = model.dequantizer
    eps, xf = torch.randn(4, 1, 8, 8), x.float()
    with torch.no_grad():
        u, log_q = deq.noise(eps, xf)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            context = deq.context_net(xf)
        u_ref, logdet = deq.flow(eps, context)
    torch.testing.assert_close(u, u_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(log_q, standard_normal_log_prob(eps) - logdet, rtol=1e-6, atol=1e-5)


def test_log_dets_of_bf16_values_accumulate_in_float32():
    """Log-dets accumulate in float32 for anything but float64 (a mutant summed bf16 values in bf16:
    1 + 256 ones came to 256)."""
    x = torch.ones(2, 257, dtype=torch.bfloat16)
    assert sum_per_sample(x).dtype == zero_logdet(x).dtype == torch.float32
    assert sum_per_sample(x).tolist() == [257.0, 257.0]
    assert sum_per_sample(x.double()).dtype == torch.float64


@pytest.mark.parametrize("setting", ["layernorm", "weight_norm"])
def test_the_context_networks_layernorm_and_weight_norm_follow_the_spec(setting):
    """`context(layernorm=on)` puts a LayerNorm after each gated conv and `context(weight_norm=on)`
    normalises each conv and dense layer; both off by default (a mutant dropped each setting)."""

    def context(on: str) -> torch.nn.Module:
        spec = variational_spec(f"filters=4, blocks=2, {setting}={on}")
        return flowspec.build(spec, "meta").dequantizer.context_net

    def marked(net: torch.nn.Module) -> int:
        if setting == "layernorm":
            return sum(isinstance(m, torch.nn.LayerNorm) for m in net.modules())
        return sum(isinstance(m, Dense | Conv) and m.gain is not None for m in net.modules())

    assert marked(context("off")) == 0
    assert marked(context("on")) == (2 if setting == "layernorm" else 1 + 2 * 2)


def test_a_loaded_model_keeps_its_data_dependent_init():
    """The "initialised" flags are saved in the state dict, so a loaded model never re-initialises
    (a mutant made them non-persistent: initialize then overwrote the loaded weights)."""
    torch.manual_seed(0)
    spec = variational_spec("filters=4, blocks=1")
    model = flowspec.build(spec)
    model.initialize(torch.randint(0, 17, (8, 1, 8, 8)))
    state = model.state_dict()
    assert sum(key.endswith("initialized") for key in state) >= 10
    loaded = flowspec.build(spec)
    loaded.load_state_dict(state)
    loaded.initialize(torch.randint(0, 17, (8, 1, 8, 8), generator=torch.Generator().manual_seed(5)))
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_the_context_network_drops_out_as_much_as_the_dequantizers_most_dropping_coupling():
    """With couplings of different dropout, the context network takes the largest (a mutant took the
    smallest; the existing test gives every coupling the same rate)."""
    spec = flowspec.parse_spec(
        """model t
data digits { shape 1x8x8  levels 17 }
dequantize variational {
  context(filters=4, blocks=1)
  split checkerboard { coupling(filters=4, blocks=1, heads=2, dropout=0.1); flip
                       coupling(filters=4, blocks=1, heads=2, dropout=0.3) }
  sigmoid
}
flow { split checkerboard { coupling(filters=4, blocks=1, heads=2) } }
prior normal
"""
    )
    context = flowspec.build(spec, "meta").dequantizer.context_net
    assert {m.p for m in context.modules() if isinstance(m, Dropout)} == {0.3}


def test_the_copies_of_a_repeat_are_tagged_with_their_repeat_index():
    """Each copy a `repeat` makes has `repeat_index` 0, 1, ... and steps outside a repeat None (a mutant
    tagged none of them)."""
    spec = flowspec.parse_spec(
        "model t\ndata digits { shape 1x8x8  levels 17 }\n"
        "flow { norm; split checkerboard {\n"
        "  repeat 3 { coupling affine(filters=4, blocks=1, heads=2); flip }\n} }\n"
    )
    layers = list(flowspec.build(spec, "meta").flow.layers)
    assert layers[0].repeat_index is None and layers[1].repeat_index is None
    inner = list(layers[1].body.layers)
    assert [m.repeat_index for m in inner] == [0, 0, 1, 1, 2, 2]
    assert len({m.spec_path for m in inner}) == 2


def _network(settings: str) -> torch.nn.Module:
    spec = flowspec.parse_spec(
        "model t\ndata digits { shape 1x8x8  levels 17 }\n"
        f"flow {{ split checkerboard {{ coupling affine(filters=4, blocks=1, {settings}) }} }}\n"
    )
    return flowspec.build(spec, "meta").couplings()[0].network


def _blocks(net: torch.nn.Module) -> list[FlowppBlock]:
    return list(net.blocks)


@pytest.mark.parametrize(
    ("settings", "check"),
    [
        ("heads=2, final_elu=on", lambda n: n.final_elu and n.proj_out.in_channels == 8),
        ("heads=2, final_elu=off", lambda n: not n.final_elu and n.proj_out.in_channels == 4),
        ("heads=2, nin=off", lambda n: isinstance(_blocks(n)[0].conv.c2, Conv)),
        ("heads=2, nin=on", lambda n: isinstance(_blocks(n)[0].conv.c2, Dense)),
        ("heads=2", lambda n: _blocks(n)[0].attn.heads == 2),
        ("heads=1", lambda n: _blocks(n)[0].attn.heads == 1),
        ("attention=off", lambda n: isinstance(_blocks(n)[0].attn, GatedNIN)),
        ("network=gated", lambda n: _blocks(n)[0].attn is None),
        ("heads=2, layernorm=off", lambda n: not any(isinstance(m, torch.nn.LayerNorm) for m in n.modules())),
        ("heads=2, weight_norm=on", lambda n: n.proj_in.gain is not None),
        ("heads=2, dropout=0.2", lambda n: _blocks(n)[0].conv.dropout.p == 0.2),
    ],
)
def test_each_coupling_setting_reaches_its_network(settings, check):
    """A coupling step's final_elu, nin, heads, attention, network, layernorm, weight_norm and dropout
    each reach the Flow++ network it builds (mutants dropped final_elu and nin, which no other test of a
    built model looked at)."""
    assert check(_network(settings))


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_a_norm_steps_granularity_reaches_its_layer(granularity):
    """`norm channel` is an actnorm (one scale per channel), `norm element` one per element (a mutant
    built every norm per element)."""
    spec = flowspec.parse_spec(
        f"model t\ndata digits {{ shape 2x8x8  levels 17 }}\nflow {{ norm {granularity}; squeeze; norm }}\n"
    )
    first, _, second = flowspec.build(spec, "meta").flow.layers
    assert first.g.shape == ((1, 2, 8, 8) if granularity == "element" else (1, 2, 1, 1))
    assert second.g.shape == (1, 8, 4, 4)


def test_a_channel_masked_variational_dequantizer_runs():
    """With `split channel` the context network's first conv takes the image's C channels (its two
    halves of C/2), not 2C as for the other masks (a mutant took 2C: the model built, then failed on its
    first image)."""
    coupling = "coupling(filters=4, blocks=1, heads=2, components=2)"
    spec = flowspec.parse_spec(
        f"""model t
data digits {{ shape 2x4x4  levels 17 }}
dequantize variational {{
  context(filters=4, blocks=1)
  split channel {{ {coupling}; flip; {coupling} }}
  sigmoid
}}
flow {{ split channel {{ {coupling} }} }}
prior normal
"""
    )
    torch.manual_seed(0)
    model = flowspec.build(spec)
    assert model.dequantizer.context_net.proj.in_channels == 2
    x = torch.randint(0, 17, (4, 2, 4, 4))
    model.initialize(x)
    with torch.no_grad():
        assert torch.isfinite(model.log_prob(x)).all()


def test_a_fusable_chain_is_compiled_with_the_backend_it_is_given(monkeypatch):
    """`fused="backend"` compiles the chain with that backend, once, and None runs it eager (a mutant
    ran every chain eager whatever `fuse_elementwise` set)."""
    compiled = []

    def fake_compile(fn, backend, dynamic):
        compiled.append(backend)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    chain = Fusable(lambda x, y: torch.addcmul(x, y, y))
    x = torch.randn(3)
    torch.testing.assert_close(chain(x, x, fused="some backend"), chain(x, x))
    chain(x, x, fused="some backend")
    assert compiled == ["some backend"]


def test_the_dequantizers_couplings_read_the_context_features():
    """Every gated conv of the dequantizer's couplings projects the context network's features (width
    `context.filters`), so u depends on the image for the same noise (a mutant built them without
    context: u was the same for every image)."""
    torch.manual_seed(0)
    model = flowspec.build(variational_spec("filters=6, blocks=1"))
    projections = [m.a_proj for m in model.dequantizer.flow.modules() if isinstance(m, GatedConv)]
    assert len(projections) == 2 and all(p is not None and p.in_features == 12 for p in projections)
    x = torch.randint(0, 17, (4, 1, 8, 8))
    model.initialize(x)
    eps = torch.randn(1, 1, 8, 8).expand(2, 1, 8, 8)
    with torch.no_grad():
        u, _ = model.eval().dequantizer.noise(eps, torch.stack([x[0], x[1]]).float())
    assert (u[0] - u[1]).abs().max() > 1e-3


def test_the_logit_preprocessing_keeps_1_minus_y_exact_near_the_top():
    """1 - y is computed as alpha + scale (levels - v), exact where y rounds near 1: with a small alpha
    and v near levels, float32 matches float64 (a mutant took 1 - y and lost the logit's last digits)."""
    layer = LogitPreprocess(1e-6, 256)
    v = torch.tensor([[255.9999, 255.99, 0.0001]], dtype=torch.float64)
    out, logdet = layer(v.float())
    want, want_logdet = layer(v.float().double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(logdet.double(), want_logdet, rtol=1e-6, atol=0)


def test_a_factor_out_step_sends_half_its_channels_and_decodes():
    """`factor_out` records the shape it sends to the prior (half the channels), which the latent's layout
    and the inverse use (a mutant recorded its input's shape: encode ran, decode failed)."""
    spec = flowspec.parse_spec(
        "model t\ndata digits { shape 1x8x8  levels 17 }\n"
        "flow { squeeze; factor_out; split checkerboard { coupling affine(filters=4, blocks=1, heads=2) } }\n"
    )
    torch.manual_seed(0)
    model = flowspec.build(spec).double().eval()
    factor = model.flow.layers[1]
    assert factor.factored_shape == (2, 4, 4)
    v = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 17
    z, _ = model.encode(v)
    torch.testing.assert_close(model.decode(z), v)
