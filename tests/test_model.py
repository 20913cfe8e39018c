"""Every distinct shipped model, shrunk, compiled and checked in float64: exact encode/decode with the
Jacobian's log-det, gradients, train == eval, save/load, data-dependent init once, dequantizer, sampling,
hooks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SPECS
from model_helpers import distinct_models, jacobian_logdet, perturb, tiny_spec

import flowspec
from flowspec.layers import DataInit, Layer
from flowspec.layers import attention as attention_module
from flowspec.layers.networks import FlowppNetwork
from flowspec.steps import walk

NAMES = distinct_models()


def _batch(spec, n: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.data.levels, (n, *spec.data.shape), generator=gen)


def _has_batch_norm(model) -> bool:
    return any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.fixture(scope="module", params=NAMES)
def built(request):
    """(spec, float64 model: data-initialised, then perturbed so no coupling is the identity)."""
    torch.manual_seed(0)
    spec = tiny_spec(request.param)
    model = flowspec.build(spec).double()
    model.initialize(_batch(spec))
    perturb(model, 0.02)
    return spec, model


def _log_prob(model, x, seed=1):
    torch.manual_seed(seed)
    return model.log_prob(x)


def test_encode_is_exact_with_jacobian_logdet(built):
    spec, model = built
    model.eval()
    v = _batch(spec, 2).double() + torch.rand(2, *spec.data.shape, dtype=torch.float64)
    z, logdet = model.encode(v)
    assert z.shape == v.shape and logdet.shape == (2,) and logdet.dtype == torch.float64
    assert (model.decode(z) - v).abs().max() < 1e-8
    assert abs(jacobian_logdet(lambda t: model.encode(t)[0], v[:1], model=model) - logdet[0]) < 1e-6


def test_two_factor_outs_of_different_shapes_encode_and_decode_exactly():
    """No shipped spec factors out twice; a flow may. The latents go back in the reverse order."""
    spec = flowspec.parse_spec(
        "model two\ndata digits { shape 1x8x8  levels 17 }\n"
        "defaults { coupling(filters=4, blocks=1, components=2, heads=1, dropout=0) }\n"
        "flow {\n  split checkerboard { coupling; flip }\n  squeeze\n  split channel { coupling; flip }\n"
        "  factor_out\n  squeeze\n  split channel { coupling; flip }\n  factor_out\n"
        "  split channel { coupling; flip }\n}\n"
    )
    torch.manual_seed(0)
    model = flowspec.build(spec).double()
    model.initialize(_batch(spec))
    perturb(model, 0.02)
    model.eval()
    v = _batch(spec, 2).double() + torch.rand(2, *spec.data.shape, dtype=torch.float64)
    z, logdet = model.encode(v)
    assert (model.decode(z) - v).abs().max() < 1e-8
    assert abs(jacobian_logdet(lambda t: model.encode(t)[0], v[:1], model=model) - logdet[0]) < 1e-6


def test_decode_gives_the_inverse_map_and_its_logdet(built):
    spec, model = built
    model.eval()
    z = 0.5 * torch.randn(
        2, *spec.data.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    v, logdet = model.decode(z, with_logdet=True)
    assert torch.equal(v, model.decode(z)) and logdet.shape == (2,)
    assert abs(jacobian_logdet(lambda t: model.decode(t), z[:1], model=model) - logdet[0]) < 1e-6


def test_log_prob_is_the_bound(built):
    spec, model = built
    model.eval()
    x = _batch(spec, 3)
    torch.manual_seed(5)
    v, log_q = model.dequantizer(x.double())
    z, logdet = model.encode(v)
    prior = -0.5 * (z.square().flatten(1).sum(1) + spec.dims * math.log(2 * math.pi))
    lp = _log_prob(model, x, 5)
    assert lp.shape == (3,) and lp.dtype == torch.float64
    assert torch.allclose(lp, prior + logdet - log_q)
    torch.manual_seed(5)
    assert torch.allclose(model.bpd(x), -lp / (spec.dims * math.log(2)))
    assert ((v - x) > 0).all() and ((v - x) < 1).all()


def test_dequantizer_noise_and_log_q(built):
    spec, model = built
    deq = model.dequantizer
    if spec.dequantize.kind == "uniform":
        assert not list(deq.parameters())
        return
    model.eval()
    x = _batch(spec, 2).double()
    eps = torch.randn(2, *spec.data.shape, dtype=torch.float64)
    u, log_q = deq.noise(eps, x)
    assert (u > 0).all() and (u < 1).all()
    log_normal = -0.5 * (eps[:1].square().sum() + spec.dims * math.log(2 * math.pi))
    jac = jacobian_logdet(lambda t: deq.noise(t, x[:1])[0], eps[:1])
    assert abs(log_q[0] - (log_normal - jac)) < 1e-6
    # the noise depends on the image through the context network
    assert not torch.allclose(deq.noise(eps, x)[0], deq.noise(eps, (x + 1) % spec.data.levels)[0])


def test_every_parameter_gets_a_gradient(built):
    spec, model = built
    model.train()
    model.zero_grad()
    _log_prob(model, _batch(spec, 4)).mean().backward()
    for name, p in model.named_parameters():
        if name in _unused_position_embeddings(model):  # as the official gated coupling network's
            assert p.grad is None, name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def _unused_position_embeddings(model) -> set[str]:
    """The position embeddings of networks without attention (`coupling(network=gated)`)."""
    return {
        f"{name}.pos_emb"
        for name, m in model.named_modules()
        if isinstance(m, FlowppNetwork) and all(b.attn is None for b in m.blocks)
    }


def test_train_and_eval_agree_without_dropout(built):
    spec, model = built
    if _has_batch_norm(model):
        pytest.skip("batch norm uses batch statistics in training mode (RealNVP's ResNets)")
    x = _batch(spec, 3)
    model.train()
    with torch.no_grad():
        train = _log_prob(model, x)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(train, _log_prob(model, x), rtol=0, atol=1e-10)


def test_save_load_gives_identical_log_prob_and_keeps_the_init(built, tmp_path):
    spec, model = built
    model.eval()
    x = _batch(spec, 3)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    loaded = flowspec.build(spec).double()
    assert loaded.initialized == (not any(isinstance(m, DataInit) for m in model.modules()))
    loaded.load_state_dict(torch.load(tmp_path / "m.pt"))
    loaded.eval()
    assert loaded.initialized
    with torch.no_grad():
        assert torch.equal(_log_prob(loaded, x), _log_prob(model, x))
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    loaded.initialize(_batch(spec, 16, seed=7) // 2)  # a no-op: the flags were loaded
    after = loaded.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sampling_a_model_in_training_mode_decodes_in_eval_mode_without_dropout():
    """The shrunk models have no dropout; with it, a model left in training mode must still sample as in
    eval mode (dropout off), and be left in training mode."""
    spec = flowspec.load_spec(SPECS / "quickstart.flow", ["defaults.coupling.dropout=0.5"])
    torch.manual_seed(0)
    model = flowspec.build(spec)
    model.initialize(_batch(spec))
    perturb(model, 0.05)
    model.train()
    first = model.sample(8, generator=torch.Generator().manual_seed(1))
    again = model.sample(8, generator=torch.Generator().manual_seed(1))
    assert model.training and torch.equal(first, again)
    assert torch.equal(model.eval().sample(8, generator=torch.Generator().manual_seed(1)), first)


def test_sample_gives_integer_images(built):
    spec, model = built
    gen = torch.Generator().manual_seed(0)
    model.train()
    x = model.sample(3, temperature=0.7, generator=gen)
    assert model.training  # sampling restores the mode
    assert x.dtype == torch.uint8 and x.shape == (3, *spec.data.shape)
    assert int(x.max()) < spec.data.levels
    again = model.sample(3, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again) and not torch.equal(x[0], x[1])
    mode = model.sample(3, temperature=0.0, generator=gen)  # T scales the prior: every draw is z = 0
    assert torch.equal(mode[0], mode[1]) and torch.equal(mode[1], mode[2])


def test_per_step_logdets_from_hooks_sum_to_the_total(built):
    spec, model = built
    model.eval()
    top = [m for m in model.flow.layers]
    assert all(isinstance(m, Layer) and m.spec_path.startswith("flow.") for m in top)
    seen = []
    handles = [m.register_forward_hook(lambda m, i, o: seen.append(o[1])) for m in top]
    try:
        y, logdet_pre = model.preprocess(_batch(spec, 2).double() + 0.5)
        _, logdet = model.flow(y)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(top)
    assert torch.allclose(torch.stack(seen).sum(0), logdet)


def test_spec_paths_follow_the_written_steps(built):
    spec, model = built
    runs = list(walk(spec.flow, spec.data.shape, "flow").all())
    if spec.dequantize.kind == "variational":
        runs += walk(spec.dequantize.steps, spec.data.shape, "dequantize").all()
        assert model.dequantizer.context_net.spec_path == "dequantize.context"
    written = {r.path for r in runs if r.step.kind != "repeat"}  # repeats are unrolled into copies
    built_paths = {m.spec_path for m in model.modules() if isinstance(m, Layer) and m.spec_path}
    assert built_paths == written | {"preprocess"}


def test_repeats_get_their_own_parameters_and_index():
    spec = tiny_spec("flowpp_cifar.flow")
    model = flowspec.build(spec)
    couplings = [m for m in model.flow.modules() if getattr(m, "spec_path", "") == "flow.0.body.0.body.2"]
    assert [c.repeat_index for c in couplings] == [0, 1, 2, 3]
    assert couplings[0].network.proj_in.weight.data_ptr() != couplings[1].network.proj_in.weight.data_ptr()


def test_initialize_runs_once():
    spec = tiny_spec("quickstart.flow")
    model = flowspec.build(spec)
    assert not model.initialized
    model.initialize(_batch(spec))
    assert model.initialized
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.initialize(_batch(spec, seed=3))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_initialize_under_autocast_takes_the_statistics_in_the_models_precision():
    """Data-dependent init with bf16 autocast set gives the float32 init (bf16 statistics scaled some
    layers by 100x), and leaves autocast as it was."""
    spec = tiny_spec("flowpp_cifar.flow")
    models = []
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = flowspec.build(spec)
        model.set_autocast(dtype)
        model.initialize(_batch(spec))
        models.append(model)
    plain, autocast = (dict(m.state_dict()) for m in models)
    assert all(torch.equal(plain[k], autocast[k]) for k in plain)
    assert {m.autocast_dtype for m in models[1].modules() if hasattr(m, "autocast_dtype")} == {torch.bfloat16}


def test_sampling_that_overflows_is_an_error_not_black_images():
    spec = tiny_spec("quickstart.flow")
    model = flowspec.build(spec)
    model.initialize(_batch(spec))
    with pytest.raises(ValueError, match="sampling at temperature 1e\\+30 gave values that are not finite"):
        model.sample(2, 1e30, generator=torch.Generator().manual_seed(0))


def test_autocast_keeps_logdets_in_float32():
    spec = tiny_spec("flowpp_cifar.flow")
    model = flowspec.build(spec)
    model.initialize(_batch(spec))
    model.eval()
    logdets = []
    for coupling in model.couplings():
        coupling.register_forward_hook(lambda module, args, out: logdets.append(out[1]))
    reference = _log_prob(model, _batch(spec, 2))
    exact, logdets[:] = logdets[:], []
    model.set_autocast(torch.bfloat16)
    lp = _log_prob(model, _batch(spec, 2))
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    assert torch.allclose(lp, reference, rtol=1e-3)  # measured 4e-5
    assert len(logdets) == len(exact) == len(model.couplings())
    for bf16, float32 in zip(
        logdets, exact, strict=True
    ):  # each coupling's, within 0.02 nats (measured 0.007)
        assert bf16.dtype == torch.float32 and torch.allclose(bf16, float32, atol=0.02)
    model.set_autocast(None)
    assert torch.equal(_log_prob(model, _batch(spec, 2)), reference)


def test_a_float64_model_computes_in_float64_under_autocast_too():
    """A bf16 run's model (autocast on) made float64 with `.double()`: autocast leaves float64 alone, so it
    computes as the float64 model without autocast (the gated layers cast it to bf16)."""
    spec = tiny_spec("flowpp_cifar.flow")
    model = flowspec.build(spec)
    model.initialize(_batch(spec))
    model.eval().double()
    reference = _log_prob(model, _batch(spec, 2))
    model.set_autocast(torch.bfloat16)
    assert torch.equal(_log_prob(model, _batch(spec, 2)), reference)


def test_count_parameters_splits_flow_and_dequantizer():
    model = flowspec.build(tiny_spec("flowpp_cifar.flow"))
    counts = model.count_parameters()
    assert counts["total"] == counts["flow"] + counts["dequantizer"] > 0
    assert 0 < counts["context"] < counts["dequantizer"]


def _model_twice(name: str) -> tuple[flowspec.FlowModel, flowspec.FlowModel, torch.Tensor]:
    """Two initialised tiny models of a shipped spec with the same weights, and the batch."""
    spec = tiny_spec(name)
    first, second = flowspec.build(spec), flowspec.build(spec)
    x = _batch(spec)
    first.initialize(x)
    second.load_state_dict(first.state_dict())
    return first, second, x


def _assert_same_training_gradients(eager, other, x, recompute: bool) -> None:
    """A training step of each (the same dropout masks) gives the same gradients."""
    for model in (eager, other):
        model.set_recompute(recompute)
        model.train()
        torch.manual_seed(0)
        (-model.log_prob(x).mean()).backward()
    for (name, p), q in zip(eager.named_parameters(), other.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("recompute", [True, False])
def test_compiled_networks_train_like_eager_ones(recompute):
    """torch.compile, through the blocks' selective recomputation or keeping every activation, gives the
    eager gradients (the "aot_eager" backend traces forward and backward like inductor, without
    generating C++), the couplings' mixture logit-CDF compiled too; the chains inside the networks are
    left to the networks' graphs (a compiled chain inside one would break it)."""
    eager, compiled, x = _model_twice("flowpp_cifar.flow")
    compiled.compile_networks(backend="aot_eager")
    assert all(c.network._compiled_call_impl is not None for c in compiled.couplings())
    assert all(c.fused == "aot_eager" for c in compiled.couplings())  # the mixture's chain between them
    assert all(
        m.fused is None for c in compiled.couplings() for m in c.network.modules() if hasattr(m, "fused")
    )
    torch._dynamo.reset()  # compile afresh, so the counters see every graph
    counters = torch._dynamo.utils.counters
    counters.clear()
    _assert_same_training_gradients(eager, compiled, x, recompute)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]


@pytest.mark.parametrize("amx", [False, True], ids=["chunked-forward", "fused-forward"])
def test_compiled_bf16_networks_on_a_cpu_are_whole_graphs(monkeypatch, request, amx):
    """In bf16 on the CPU the networks' attention picks its kernel by asking whether the CPU has AMX tiles;
    torch.compile must take the answer as a constant, not break each network's graph at the probe (it
    did: 18 breaks and 28 graphs in a tiny model's training step and log_prob). Eval log_prob in bf16 is
    close to float32's."""
    request.addfinalizer(attention_module.has_amx_tiles.cache_clear)  # the machine's own answer after
    attention_module.has_amx_tiles.cache_clear()
    # as torch's own probe, a function dynamo does not trace
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", torch._dynamo.disable(lambda: amx))
    assert attention_module.fused_forward() is amx
    eager, compiled, x = _model_twice("flowpp_cifar.flow")
    compiled.set_autocast(torch.bfloat16)
    compiled.compile_networks(backend="aot_eager")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled.train()
    (-compiled.log_prob(x).mean()).backward()
    for model in (eager, compiled):
        model.eval()
    assert torch.allclose(_log_prob(compiled, x), _log_prob(eager, x), rtol=0.01)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]


@pytest.mark.parametrize("recompute", [True, False])
def test_fused_elementwise_chains_give_the_eager_log_prob_and_gradients(recompute):
    """`fuse_elementwise` (what --compile does on a CPU) compiles concat_elu with its dropout mask, the
    gated residuals and the mixture's logit-CDF, in eval mode and through a training step with or
    without the blocks' selective recomputation; the result is the eager one. Every module that calls
    a chain is switched, and `None` switches them back."""
    eager, fused, x = _model_twice("flowpp_cifar.flow")
    fused.fuse_elementwise("aot_eager")
    torch._dynamo.reset()  # compile afresh, so the counters see every graph
    counters = torch._dynamo.utils.counters
    counters.clear()
    switched = [m for m in fused.modules() if hasattr(m, "fused")]
    callers = {"Conv", "Dense", "GatedConv", "GatedAttention", "FlowppBlock", "Coupling"}
    assert {type(m).__name__ for m in switched} >= callers
    assert all(m.fused == "aot_eager" for m in switched)
    for model in (eager, fused):
        model.eval()
    assert torch.allclose(_log_prob(fused, x), _log_prob(eager, x), rtol=1e-5)
    _assert_same_training_gradients(eager, fused, x, recompute)
    assert counters["stats"]["unique_graphs"] >= 3 and not counters["graph_break"]
    fused.fuse_elementwise(None)
    assert all(m.fused is None for m in switched)


def test_compile_for_device_fuses_chains_on_a_cpu():
    model = flowspec.build(tiny_spec("flowpp_cifar.flow"))
    assert model.compile_for_device() == "elementwise"
    assert all(m.fused == "inductor" for m in model.modules() if hasattr(m, "fused"))
    assert all(c.network._compiled_call_impl is None for c in model.couplings())  # networks stay eager


def test_moves_between_dtypes_and_takes_any_integer_input():
    torch.manual_seed(0)
    spec = tiny_spec(NAMES[0])
    model = flowspec.build(spec)
    x = _batch(spec, 4).to(torch.uint8 if spec.data.levels <= 256 else torch.int32)
    model.initialize(x)
    model.eval()
    v = x.float() + 0.5  # fixed dequantization: the noise of the two dtypes differs
    single = model.encode(v)[1]
    double = model.to(torch.float64)
    assert double is model and model.dtype == torch.float64 and model.device.type == "cpu"
    assert _log_prob(model, x).dtype == torch.float64 and model.encode(v)[1].dtype == torch.float64
    torch.testing.assert_close(model.encode(v)[1].float(), single, rtol=1e-4, atol=1e-3)
    assert model.sample(2).dtype in (torch.uint8, torch.int32) and model.float().dtype == torch.float32


def test_sample_floors_the_decoded_noise_scaled_by_the_temperature(built):
    """A sample is decode(T z) with z ~ N(0, I) from the generator, floored to the integer levels (the
    dequantization added noise in [0, 1) to each integer) and clamped to them."""
    spec, model = built
    model.eval()
    levels, temperature = spec.data.levels, 0.7
    drawn = model.sample(6, temperature, generator=torch.Generator().manual_seed(4))
    z = torch.randn(6, *spec.data.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        v = model.decode(temperature * z)
    expected = v.floor().clamp(0, levels - 1).to(torch.uint8 if levels <= 256 else torch.int32)
    assert drawn.dtype == expected.dtype and torch.equal(drawn, expected)
    assert not torch.equal(v.round().clamp(0, levels - 1).to(expected.dtype), expected)  # floor is seen
