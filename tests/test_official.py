"""The official Flow++ models beyond CIFAR-10 (ImageNet 32/64, CelebA 64/128): golden parameter counts
on the meta device, the network options they need, their learning-rate schedules, their data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import SPECS
from model_helpers import perturb, tiny_spec

import flowspec
from flowspec.errors import UserError
from flowspec.layers.networks import ContextNetwork, Dense, FlowppNetwork
from flowspec.train.data import ImageSet, load_split
from flowspec.train.schedule import LrFactor, build_scheduler
from flowspec.train.trainer import RunOptions, train

# launcher -> (spec, docstring count, main flow, dequantizer with its context, context)
OFFICIAL = {
    "imagenet32.flow": (168_955_724, 133_406_188, 35_549_536, 506_624),
    "imagenet64.flow": (73_489_960, 67_835_520, 5_654_440, 279_040),
    "imagenet64_5bit.flow": (73_489_960, 67_835_520, 5_654_440, 279_040),
    "celeba64_5bit.flow": (73_489_960, 67_835_520, 5_654_440, 279_040),
    "celeba64_3bit.flow": (73_489_960, 67_835_520, 5_654_440, 279_040),
    "celeba128_5bit.flow": (122_790_952, 114_482_304, 8_308_648, 279_040),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_spec_has_the_docstring_count(name):
    spec = flowspec.load_spec(SPECS / name)
    model = flowspec.build(spec, "meta")
    total, flow, deq, context = OFFICIAL[name]
    assert model.count_parameters() == {"total": total, "flow": flow, "dequantizer": deq, "context": context}
    assert spec.target_params == total


def test_meta_build_counts_like_a_real_one():
    spec = tiny_spec("imagenet32.flow")
    meta, real = flowspec.build(spec, "meta"), flowspec.build(spec)
    assert next(meta.parameters()).is_meta and not next(real.parameters()).is_meta
    assert meta.count_parameters() == real.count_parameters()
    assert [(n, p.shape) for n, p in meta.named_parameters()] == [
        (n, p.shape) for n, p in real.named_parameters()
    ]


def _network_arithmetic(c, h, w, f, blocks, k, *, mixer, layernorm, nin, final_elu, weight_norm, cf=0):
    """The official coupling network's parameters, counted by hand (g: the weight-norm gains)."""

    def layer(n_in, n_out, kernel):
        return kernel * kernel * n_in * n_out + n_out + (n_out if weight_norm else 0)

    per_block = layer(2 * f, f, 3) + layer(2 * f, 2 * f, 1 if nin else 3) + (layer(2 * cf, f, 1) if cf else 0)
    per_block += 2 * f * layernorm
    if mixer:
        per_block += layer(f, 3 * f, 1) + layer(f, 2 * f, 1) + 2 * f * layernorm
    out = layer(2 * f if final_elu else f, c * (2 + 3 * k), 3)
    return h * w * f + layer(c, f, 3) + blocks * per_block + out


@pytest.mark.parametrize(
    "options",
    [
        dict(mixer=True, layernorm=True, nin=True, final_elu=False, weight_norm=False),  # CIFAR
        dict(mixer=True, layernorm=True, nin=True, final_elu=True, weight_norm=True),  # ImageNet 32
        dict(mixer=False, layernorm=True, nin=True, final_elu=True, weight_norm=False),  # 64: dequantizer
        dict(mixer=False, layernorm=False, nin=False, final_elu=False, weight_norm=True),
    ],
)
def test_network_options_count_as_the_official_code(options):
    net = FlowppNetwork((3, 8, 4), 3 * 14, 16, 2, 4, True, 0.0, 5, **options)
    expected = _network_arithmetic(3, 8, 4, 16, 2, 4, cf=5, **options)
    assert sum(p.numel() for p in net.parameters()) == expected


def test_gated_network_keeps_the_unused_position_embedding():
    net = FlowppNetwork((3, 8, 4), 3 * 14, 16, 2, 4, True, 0.0, mixer=False)
    assert net.pos_emb.shape == (8, 4, 16) and all(b.attn is None for b in net.blocks)
    net(torch.randn(2, 3, 8, 4)).sum().backward()
    assert net.pos_emb.grad is None and net.proj_in.weight.grad is not None


def test_weight_norm_is_gain_times_direction_and_data_initialised():
    torch.manual_seed(0)
    layer = Dense(6, 5, init_scale=0.1, weight_norm=True)
    assert sum(p.numel() for p in layer.parameters()) == 6 * 5 + 5 + 5
    v = layer.weight.detach()
    assert torch.allclose(layer.effective_weight(), v / v.norm(dim=1, keepdim=True))
    layer.init_mode = True
    y = layer(3 + torch.randn(512, 6)).detach()
    assert (y.std(0, correction=0) - 0.1).abs().max() < 1e-5 and y.mean(0).abs().max() < 1e-6
    assert torch.equal(layer.weight.detach(), v)  # the direction is kept, the gain rescaled
    assert torch.allclose(layer.effective_weight().norm(dim=1), layer.gain.detach())


@pytest.mark.parametrize(
    ("options", "params"),
    [
        (dict(), 6 * 9 * 8 + 8 + 2 * (9 * 16 * 8 + 8 + 9 * 16 * 16 + 16)),
        (dict(layernorm=True), 6 * 9 * 8 + 8 + 2 * (9 * 16 * 8 + 8 + 9 * 16 * 16 + 16 + 16)),
        (
            dict(layernorm=True, attention=True, heads=2, weight_norm=True),
            6 * 9 * 8
            + 16
            + 8 * 3 * 8
            + 2 * (9 * 16 * 8 + 16 + 9 * 16 * 16 + 32 + 16 + 8 * 24 + 48 + 8 * 16 + 32 + 16),
        ),
    ],
)
def test_context_network_variants(options, params):
    net = ContextNetwork(3, 8, 2, "stripe", 32, 0.0, image_size=(8, 6), **options)
    assert sum(p.numel() for p in net.parameters()) == params
    x = torch.randint(0, 32, (2, 3, 8, 6)).float()
    assert net(x).shape == (2, 8, 3, 8)


def test_shrunk_celeba128_is_exactly_invertible_in_float64():
    """(Too big for the whole-model Jacobian checks of test_model.py, see `TOO_BIG`.)"""
    torch.manual_seed(0)
    spec = tiny_spec("celeba128_5bit.flow")
    model = flowspec.build(spec).double()
    x = torch.randint(0, spec.data.levels, (8, *spec.data.shape))
    model.initialize(x)
    perturb(model, 0.02)
    model.eval()
    v = x[:2].double() + torch.rand(2, *spec.data.shape, dtype=torch.float64)
    z, logdet = model.encode(v)
    assert (model.decode(z) - v).abs().max() < 1e-8 and torch.isfinite(logdet).all()
    eps = torch.randn(2, *spec.data.shape, dtype=torch.float64)
    u, _ = model.dequantizer.flow(eps, model.dequantizer.context_net(x[:2].double()))
    eps_back = model.dequantizer.flow.inverse(u, model.dequantizer.context_net(x[:2].double()))
    assert (eps_back - eps).abs().max() < 1e-8


# ---------------------------------------------------------------- recipes


def test_exponential_schedule_factors():
    factor = LrFactor(
        warmup=10, kind="exponential", total=None, every=1, gamma=1.0, hold=5, decay=0.5, floor=0.1
    )
    assert factor(0) == 0.0 and factor(1) == pytest.approx(0.1) and factor(10) == 1.0 and factor(15) == 1.0
    assert factor(16) == 0.5 and factor(17) == 0.25 and factor(1000) == 0.1


def _imagenet32_launcher(step: int, state: dict) -> float:
    """imagenet32_official.py's schedule, as written (it keeps the last value between calls)."""
    if step < 5000:
        state["lr"] = 1e-3 * step / 5000
    elif step > 50000 and state["lr"] > 3e-4:
        state["lr"] *= 0.99995
    return state["lr"]


def _celeba64_launcher(step: int, state: dict) -> float:
    """celeba64_5bit_official.py's schedule, as written."""
    if step < 20000:
        return 4e-5 * step / 20000
    if step <= 50000:
        state["lr"] = 4e-5
    elif state["lr"] > 1e-5:
        state["lr"] *= 0.9995
    return state["lr"]


def _imagenet64_5bit_launcher(step: int, state: dict) -> float | None:
    """imagenet64_5bit_official.py's schedule, as written (None at the steps its conditions skip)."""
    if step < 10000:
        return 4e-4 * step / 10000
    if 10000 < step < 50000:
        state["lr"] = 4e-4
        return 4e-4
    if step > 50000 and state["lr"] > 3e-4:
        state["lr"] *= 0.9995
        return state["lr"]
    if step > 50000 and step < 110000:
        return 3e-4
    if 110000 < step < 130000:
        return 1e-5 * (step - 110000) / 20000
    return 1e-5 if step > 130000 else None


@pytest.mark.parametrize(
    ("name", "launcher", "steps"),
    [
        ("imagenet32.flow", _imagenet32_launcher, 80_000),
        ("celeba64_5bit.flow", _celeba64_launcher, 80_000),
        ("imagenet64_5bit.flow", _imagenet64_5bit_launcher, 213_524),
    ],
)
def test_schedule_follows_the_launcher(name, launcher, steps):
    """The spec's learning rate is the launcher's at every step: exactly in the warmups (both start at 0),
    to 0.06% after them (imagenet32's launcher holds its last warmup value; the launchers decay once more
    after reaching the floor)."""
    train_spec = flowspec.load_spec(SPECS / name).train
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=train_spec.lr)
    factor = build_scheduler(optimizer, train_spec, None).lr_lambdas[0]
    state: dict = {}
    second = train_spec.rewarm_at or steps
    for step in range(steps):
        official = launcher(step, state)
        ours = train_spec.lr * factor(step)
        if official is None:
            continue
        warming = step < train_spec.warmup or second <= step < second + (train_spec.rewarm_steps or 0)
        assert abs(ours - official) <= (1e-12 if warming else 6e-4) * official, step
    last = train_spec.rewarm_lr if train_spec.rewarm_at is not None else train_spec.exp_floor
    assert ours == pytest.approx(last)


# ---------------------------------------------------------------- data and training


@pytest.mark.parametrize(
    ("name", "images", "processes", "epochs"),
    [
        ("imagenet32.flow", 1_281_149, 8, 2),
        ("imagenet64.flow", 1_281_149, 6, 2),
        ("imagenet64_5bit.flow", 1_281_149, 5, 2),
        ("celeba64_5bit.flow", 202_599, 8, 20),
        ("celeba64_3bit.flow", 202_599, 8, 20),
        ("celeba128_5bit.flow", 202_599, 8, 1000),
    ],
)
def test_length_is_the_launchers_epochs_of_each_process(name, images, processes, epochs):
    """An official epoch is each process's pass over the whole set at its share of the batch (the
    launchers' `iterbatches` over all of `data_train`, no partial batch), on the process count their
    docstrings name."""
    train_spec = flowspec.load_spec(SPECS / name).train
    assert train_spec.length.unit == "steps"
    assert train_spec.length.count == epochs * (images // (train_spec.batch // processes))


CIFAR = ["flowpp_cifar.flow", "ablations/affine_coupling.flow", "ablations/no_attention.flow",
         "ablations/uniform_dequant.flow"]  # fmt: skip


@pytest.mark.parametrize("name", sorted(OFFICIAL) + CIFAR)
def test_adam_adds_eps_as_the_official_tensorflow_adam(name):
    assert flowspec.load_spec(SPECS / name).train.tf_eps


def test_npy_dataset_without_data_says_what_it_needs(tmp_path):
    spec = flowspec.load_spec(SPECS / "imagenet64_5bit.flow")
    with pytest.raises(UserError, match=r"path .*missing does not exist: pass the data with --data PATH"):
        load_split(spec.data, "train", tmp_path / "missing")


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_shrunk_official_spec_trains_a_few_steps(name, tmp_path):
    torch.manual_seed(0)
    base = tiny_spec(name)
    spec = flowspec.load_spec(
        SPECS / name,
        overrides=(
            f"data.shape={'x'.join(map(str, base.data.shape))}",
            "defaults.coupling.filters=8",
            "defaults.coupling.blocks=1",
            "defaults.coupling.components=3",
            "defaults.coupling.heads=2",
            "dequantize.context.filters=4",
            "train.batch=4",
            "train.init_batch=8",
            "train.length=3 steps",
            "train.rewarm=off",  # imagenet64_5bit's starts at step 110,000
            "train.eval_every=3 steps",
        ),
    )
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, spec.data.levels, (12, *spec.data.shape), generator=gen, dtype=torch.uint8)
    data = ImageSet(images, torch.zeros(12, dtype=torch.long), "random")
    result = train(
        spec, RunOptions(out=tmp_path / "run", device="cpu", quiet=True), train_set=data, test_set=data
    )
    assert result.stopped == "finished" and math.isfinite(result.history[-1]["test_bpd"])


def test_the_official_data_files_load_as_the_launchers_read_them(tmp_path):
    """ImageNet 64 5-bit reads the 8-bit files and keeps floor(x / 8); CelebA's files are already 5-bit
    and hold no test split: the spec holds 1,000 images out of the training file."""
    rng = np.random.default_rng(0)
    imagenet = tmp_path / "imagenet64"
    imagenet.mkdir()
    eight_bit = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    np.save(imagenet / "train_64x64.npy", eight_bit)
    np.save(imagenet / "valid_64x64.npy", eight_bit[:2])
    spec = flowspec.load_spec(SPECS / "imagenet64_5bit.flow")
    train_set = load_split(spec.data, "train", imagenet)
    assert torch.equal(train_set.images, torch.from_numpy(eight_bit // 8).permute(0, 3, 1, 2))

    five_bit = rng.integers(0, 32, (1010, 64, 64, 3), dtype=np.uint8)
    np.save(tmp_path / "celeba_full_64x64_5bit.npy", five_bit)
    spec = flowspec.load_spec(SPECS / "celeba64_5bit.flow")
    splits = [
        load_split(spec.data, split, tmp_path / "celeba_full_64x64_5bit.npy") for split in ("train", "test")
    ]
    assert [len(s) for s in splits] == [10, 1000]
    together = torch.cat([s.images for s in splits]).flatten(1)
    assert sorted(map(tuple, together.tolist())) == sorted(
        map(tuple, torch.from_numpy(five_bit).permute(0, 3, 1, 2).flatten(1).tolist())
    )
