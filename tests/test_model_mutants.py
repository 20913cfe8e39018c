"""Behaviours of the model, its layers, evaluation and sampling that a mutation audit found unguarded:
each test here failed on a mutant of the code (a spec setting not reaching the dequantizer's context
network or a ResNet coupling, the latent laid out in another order, the dequantizer's noise detached or
drawn without its images' context, eval mode or a seed skipped) that every other test passed. The
invertibility and log-det tests cannot see these: the mutants stay exact bijections with the right
log-dets."""

from __future__ import annotations

import pytest
import torch
from model_helpers import perturb, variational_spec
from train_helpers import tiny_spec

import flowspec
from flowspec.layers.dropout import Dropout
from flowspec.layers.networks import GatedAttention
from flowspec.spec import EvalSpec
from flowspec.train.distributed import Dist
from flowspec.train.evaluate import bounds, inversion_error
from flowspec.train.evaluation import Evaluator
from flowspec.train.sampling import save_grid


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 17, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the builder's wiring


@pytest.mark.parametrize("mask", ["checkerboard", "stripe"])
def test_the_context_network_splits_by_the_dequantizers_own_mask(mask):
    """The context network sees x split as the dequantizer's couplings split it (not always by stripe)."""
    assert (
        flowspec.build(variational_spec("filters=4, blocks=1", mask), "meta").dequantizer.context_net.mask
        == mask
    )


def test_the_context_networks_attention_has_the_heads_the_spec_gives_it():
    spec = variational_spec("filters=4, blocks=2, layernorm=on, attention=on, heads=2")
    context = flowspec.build(spec, "meta").dequantizer.context_net
    heads = [m.heads for m in context.modules() if isinstance(m, GatedAttention)]
    assert heads == [2, 2]


@pytest.mark.parametrize("context", ["layernorm=on", "layernorm=on, attention=on, heads=2", "layernorm=off"])
def test_the_context_network_drops_out_as_much_as_the_dequantizers_couplings(context):
    """The official launchers give the context network the dequantizer's dropout, in each of its forms
    (gated convs alone, with LayerNorm, with attention)."""
    spec = variational_spec(f"filters=4, blocks=2, {context}", dropout=0.3)
    drops = [
        m for m in flowspec.build(spec, "meta").dequantizer.context_net.modules() if isinstance(m, Dropout)
    ]
    assert len(drops) >= 2 and all(m.p == 0.3 for m in drops)


@pytest.mark.parametrize("norm", ["batch", "weight"])
def test_a_resnet_coupling_normalises_as_its_spec_says(norm):
    """`resnet_norm=weight` builds weight-normalised convs and no batch norm; `batch` the reverse."""
    spec = flowspec.parse_spec(
        "model t\ndata digits { shape 1x8x8  levels 17 }\n"
        f"flow {{ split checkerboard {{ coupling affine(network=resnet, resnet_norm={norm}, filters=4, "
        "blocks=1) } }\n"
    )
    network = flowspec.build(spec, "meta").couplings()[0].network
    batch_norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    weight_normed = [hasattr(m, "parametrizations") for m in convs]
    assert len(convs) == 4 and weight_normed == [norm == "weight"] * 4
    assert len(batch_norms) == (3 if norm == "batch" else 0)


def test_the_latent_holds_the_factored_out_parts_first_then_the_last_tensor():
    """`encode`'s z (the image's shape) is the factored-out parts, flattened in order, then the flow's
    last tensor, as `Sequence` documents (the prior sees no difference, a user reading z does)."""
    spec = flowspec.parse_spec(
        "model t\ndata digits { shape 1x8x8  levels 17 }\n"
        "defaults { coupling(filters=4, blocks=1, components=2, heads=1, dropout=0) }\n"
        "flow { squeeze\n split channel { coupling; flip }\n factor_out\n split channel { coupling } }\n"
    )
    torch.manual_seed(0)
    model = flowspec.build(spec).eval()
    outputs = {}

    def keep(module: torch.nn.Module, args: tuple, out: tuple) -> None:
        outputs[type(module).__name__] = out[0]

    for layer in (model.flow.layers[2], model.flow.layers[-1]):
        layer.register_forward_hook(keep)
    z, _ = model.encode(torch.rand(2, 1, 8, 8) * 16)
    (_, factored), last = outputs["FactorOut"], outputs["Split"]
    assert torch.equal(z.flatten(1), torch.cat([factored.flatten(1), last.flatten(1)], 1))


# ---------------------------------------------------------------- initialize


def test_initialize_is_a_no_op_once_done_even_for_a_batch_it_would_refuse():
    """Once initialised (the flags are saved), initialize reads nothing: a single image is not refused."""
    torch.manual_seed(0)
    model = flowspec.build(tiny_spec())
    model.initialize(_images(16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.initialize(_images(1))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# ---------------------------------------------------------------- the variational dequantizer


@pytest.mark.usefixtures("float64_seeded")
def test_the_dequantizer_draws_its_noise_given_the_context_of_the_images_it_dequantizes():
    """forward(x) is noise(eps, x) for a standard normal eps: u conditioned on x itself (the context of
    other images, zeros say, would give another u and log q)."""
    model = flowspec.build(variational_spec("filters=4, blocks=1")).double()
    model.initialize(_images(16, seed=2))
    perturb(model, 0.05)
    deq = model.dequantizer.eval()
    x = _images(3).double()
    torch.manual_seed(5)
    v, log_q = deq(x)
    torch.manual_seed(5)
    u, log_q_of_eps = deq.noise(torch.randn_like(x), x)
    torch.testing.assert_close(v, x + u)
    torch.testing.assert_close(log_q, log_q_of_eps)


@pytest.mark.usefixtures("float64_seeded")
def test_the_dequantizers_gradient_flows_through_the_noise_into_the_main_flows_density():
    """d log_prob / d theta of a dequantizer weight is that of log p(x + u(theta)) - log q(u(theta)): the
    autograd gradient equals a central finite difference with the same noise (u not detached)."""
    spec = variational_spec("filters=4, blocks=1")
    model = flowspec.build(spec).double()
    x = _images(4)
    model.initialize(_images(16, seed=2))
    perturb(model, 0.05)
    model.eval()
    weight = model.dequantizer.flow.layers[0].body.layers[0].network.proj_out.weight

    def log_prob() -> torch.Tensor:
        torch.manual_seed(3)
        return model.log_prob(x).sum()

    (grad,) = torch.autograd.grad(log_prob(), weight)
    direction = torch.randn_like(weight)
    h = 1e-6
    with torch.no_grad():
        weight.add_(h * direction)
        up = log_prob()
        weight.sub_(2 * h * direction)
        down = log_prob()
        weight.add_(h * direction)
    torch.testing.assert_close((grad * direction).sum(), (up - down) / (2 * h), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- evaluation


class _ModeRecorder(torch.nn.Module):
    """log_prob of an image is minus its pixel sum; records whether each call came in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return -x.flatten(1).double().sum(1)


def test_the_bounds_are_measured_in_eval_mode_whatever_mode_the_model_came_in():
    """Dropout must be off for the single-sample and importance-weighted bounds of `flowspec eval`."""
    model = _ModeRecorder().train()
    bounds(model, _images(5), 2, 4, torch.device("cpu"))
    assert model.modes and not any(model.modes)


def test_the_inversion_check_of_a_model_in_training_mode_runs_without_dropout():
    """encode follows the module's mode: in training mode dropout would make it another map than the
    decode it is checked against (tiny_spec's couplings drop 10%)."""
    torch.manual_seed(0)
    model = flowspec.build(tiny_spec())
    model.initialize(_images(16))
    assert model.couplings()[0].network.blocks[0].conv.dropout.p > 0
    assert inversion_error(model.train(), _images(8), torch.device("cpu")) < 1e-3


class _Overflowing(_ModeRecorder):
    """A model whose samples are not finite at any temperature (`FlowModel.sample` raises then)."""

    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None):
        raise ValueError(f"sampling at temperature {temperature} gave values that are not finite")


def test_an_evaluation_whose_samples_are_not_finite_draws_no_grid_but_still_measures(tmp_path):
    """A model gone wrong mid-training must not end the run at its evaluation: no grid, the bound kept."""
    settings = EvalSpec(images=4, samples=4, temperatures=(0.5, 1.0), inversion=False)
    evaluator = Evaluator(
        _images(6), settings.model_copy(update={"batch": 2}), torch.device("cpu"), Dist(), tmp_path, 17, 0
    )
    result = evaluator(_Overflowing(), 3)
    assert result.grids == {} and result.images == 4 and result.test_bpd > 0
    assert not (tmp_path / "samples").exists() or not any((tmp_path / "samples").iterdir())


# ---------------------------------------------------------------- sampling


class _Drawer(torch.nn.Module):
    """Records each `sample` call: its size, its temperature and a number drawn with its generator."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, float, float]] = []

    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None):
        self.calls.append((n, temperature, float(torch.rand(1, generator=generator))))
        return torch.zeros(n, 1, 8, 8, dtype=torch.uint8)


def test_a_grid_is_drawn_in_batches_at_its_temperature_with_noise_from_its_seed(tmp_path):
    drawers = {seed: (_Drawer(), _Drawer()) for seed in (3, 4)}
    for seed, pair in drawers.items():
        for i, drawer in enumerate(pair):
            save_grid(drawer, 5, 0.7, tmp_path / f"{seed}_{i}.png", 17, seed=seed, batch=2)
    first, again = drawers[3]
    assert [(n, t) for n, t, _ in first.calls] == [(2, 0.7), (2, 0.7), (1, 0.7)]
    assert first.calls == again.calls and first.calls != drawers[4][0].calls


class _NoisyDrawer(_Drawer):
    """A `_Drawer` whose log_prob draws from torch's global generator, as dequantization does."""

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return -x.flatten(1).double().sum(1) - torch.rand(len(x), dtype=torch.float64)


@pytest.mark.parametrize("measured", [2, 6])
def test_an_evaluations_grid_is_drawn_from_the_runs_seed_whatever_it_measured_before(tmp_path, measured):
    """The evaluation's grid is the one `save_grid` draws from the seed, not from the global generator
    that the test images' dequantization noise has moved."""
    settings = EvalSpec(images=measured, samples=3, temperatures=(0.8,), inversion=False)
    evaluator = Evaluator(
        _images(8), settings.model_copy(update={"batch": 2}), torch.device("cpu"), Dist(), tmp_path, 17, 5
    )
    model, direct = _NoisyDrawer(), _Drawer()
    evaluator(model, 1)
    save_grid(direct, 3, 0.8, tmp_path / "direct.png", 17, seed=5, batch=2)
    assert model.calls == direct.calls
