"""bf16: what autocast reaches, what stays float32, how `auto` chooses, and that bf16 bits/dim and bf16
training agree with float32 (on real CIFAR-10 and on the quickstart)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import NO_CIFAR, SPECS, cifar_dir
from model_helpers import tiny_spec
from train_helpers import tiny_spec as train_spec

import flowspec
from flowspec.errors import UserError
from flowspec.layers.networks import Conv, Dense
from flowspec.train import precision
from flowspec.train.precision import resolve_precision
from flowspec.train.trainer import RunOptions, Trainer

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]


def test_explicit_precisions_pass_through_and_unknown_ones_are_refused():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == ("fp32", "")
    assert resolve_precision("bf16", cpu) == ("bf16", "")
    with pytest.raises(UserError, match="unknown precision 'fp16': use fp32, bf16, auto"):
        resolve_precision("fp16", cpu)


@pytest.mark.parametrize(
    ("capability", "flags", "expected"),
    [
        ("AVX512", {"avx512f", "avx512_bf16"}, ("bf16", "auto: CPU AVX512 with avx512_bf16")),
        ("AVX512", {"avx512f", "amx_bf16"}, ("bf16", "auto: CPU AVX512 with amx_bf16")),
        ("AVX2", {"avx2"}, ("fp32", "auto: no native bf16 on this cpu")),
    ],
)
def test_auto_picks_bf16_on_cpus_with_bf16_instructions(monkeypatch, capability, flags, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: "avx512_bf16" in flags, raising=False)
    assert resolve_precision("auto", torch.device("cpu")) == expected


def test_the_run_header_says_what_auto_chose(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision, "native_bf16", lambda device: "CPU AVX512 with avx512_bf16")
    trainer = Trainer(train_spec(steps=1), RunOptions(out=tmp_path / "run", precision="auto", quiet=False))
    assert {c.autocast_dtype for c in trainer.updater.model.couplings()} == {torch.bfloat16}
    trainer.run()
    assert "precision bf16 (auto: CPU AVX512 with avx512_bf16)" in capsys.readouterr().out


def test_bf16_reaches_every_network_and_leaves_the_densities_float32():
    """Every conv and dense layer (coupling networks and the dequantizer's context network) computes in
    bf16; log-dets, log q and log_prob stay float32."""
    spec = tiny_spec("flowpp_cifar.flow")
    model = flowspec.build(spec)
    x = torch.randint(0, 256, (4, *spec.data.shape))
    model.initialize(x)
    model.set_autocast(torch.bfloat16)
    seen: dict[str, torch.dtype] = {}
    hooks = [
        m.register_forward_hook(lambda m, i, out, name=name: seen.__setitem__(name, out.dtype))
        for name, m in model.named_modules()
        if isinstance(m, (Conv, Dense))
    ]
    v, log_q = model.dequantizer(x.float())
    z, logdet = model.encode(v)
    for hook in hooks:
        hook.remove()
    assert set(seen.values()) == {torch.bfloat16}
    assert any(name.startswith("dequantizer.context_net") for name in seen)
    assert (v.dtype, log_q.dtype, z.dtype, logdet.dtype) == (torch.float32,) * 4


def _test_images(n: int, device: str) -> torch.Tensor:
    """Real CIFAR-10 test images; where there are none, smooth synthetic ones on CUDA (a GPU machine may
    lack the data set), a skip on the CPU."""
    folder = cifar_dir()
    if folder is not None:
        with np.load(folder / "test.npz") as shard:
            return torch.from_numpy(shard["x"][:n]).permute(0, 3, 1, 2).long()
    if device == "cpu":
        pytest.skip(NO_CIFAR)
    coarse = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255
    return F.interpolate(coarse, size=32, mode="bilinear").round().long()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_bits_per_dim_on_real_cifar_match_float32(device, exact_float32):
    """The same weights, the same dequantization noise: bf16 and float32 (not TF32) bits/dim agree within
    0.01 on real CIFAR-10 test images, for a shrunk Flow++ (full resolution, attention, variational
    dequantizer)."""
    spec = flowspec.load_spec(
        SPECS / "flowpp_cifar.flow",
        overrides=(
            "defaults.coupling.filters=32",
            "defaults.coupling.blocks=2",
            "defaults.coupling.components=8",
            "dequantize.context.filters=16",
        ),
    )
    torch.manual_seed(0)
    images = _test_images(8, device)
    model = flowspec.build(spec)
    model.initialize(images)
    model.to(device).eval()
    bits = {}
    for dtype in (None, torch.bfloat16):
        model.set_autocast(dtype)
        torch.manual_seed(1)
        with torch.no_grad():
            bits[dtype] = model.bpd(images.to(device)).cpu()
    assert 3.0 < bits[None].mean() < 9.0
    assert (bits[torch.bfloat16] - bits[None]).abs().max() < 0.01
    assert not torch.equal(bits[torch.bfloat16], bits[None])  # bf16 ran: not float32 again


def _quickstart(prec: str, tmp_path) -> float:
    spec = flowspec.load_spec(
        SPECS / "quickstart.flow", overrides=("train.length=300 steps", "train.eval_every=300 steps")
    )
    options = RunOptions(out=tmp_path / prec, device="cpu", precision=prec, quiet=True)
    return Trainer(spec, options).run().test_bpd


@pytest.mark.slow
def test_bf16_training_reaches_the_float32_test_bits_per_dim(tmp_path):
    """300 quickstart steps (1 thread) in each precision end within 1% of each other."""
    fp32, bf16 = _quickstart("fp32", tmp_path), _quickstart("bf16", tmp_path)
    assert fp32 < 2.6
    assert abs(bf16 - fp32) / fp32 < 0.01, (fp32, bf16)
