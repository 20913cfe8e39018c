"""On a CUDA device (skipped without one; `bench/gpu_check.sh` runs them): the CUDA forward equals the CPU
forward, sampling decodes in float32 and bf16, and torch.compile (inductor) gives the eager result. The other
tests marked `cuda`: bf16 bits/dim against float32 (test_precision.py) and a torchrun job on NCCL that
trains and resumes (test_ddp.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ROOT
from model_helpers import perturb

import flowspec
from flowspec.layers.base import standard_normal_log_prob

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("exact_float32"),
]


def _model_and_images(n: int = 8):
    """A shrunk Flow++ (attention, variational dequantizer) at 3 x 8 x 8, initialised and perturbed."""
    torch.manual_seed(0)
    spec = flowspec.load_spec(
        ROOT / "specs" / "flowpp_cifar.flow",
        overrides=(
            "data.shape=3x8x8",
            "defaults.coupling.filters=16",
            "defaults.coupling.blocks=2",
            "defaults.coupling.components=4",
            "defaults.coupling.dropout=0",
            "dequantize.context.filters=8",
        ),
    )
    images = torch.randint(0, 256, (n, *spec.data.shape))
    model = flowspec.build(spec)
    model.initialize(images)
    perturb(model, 0.01)
    return model.eval(), images


def _parts(model, images, eps):
    """log N(z), the flow's log-det and log q for fixed dequantization noise."""
    with torch.no_grad():
        x = images.to(model.device).float()
        u, log_q = model.dequantizer.noise(eps.to(model.device), x)
        z, logdet = model.encode(x + u)
    return torch.stack([standard_normal_log_prob(z), logdet, log_q]).cpu()


def test_cuda_forward_equals_cpu_forward():
    model, images = _model_and_images()
    eps = torch.randn(images.shape)
    cpu = _parts(model, images, eps)
    cuda = _parts(copy.deepcopy(model).cuda(), images, eps)
    assert torch.allclose(cuda, cpu, rtol=1e-4, atol=1e-3), (cuda - cpu).abs().max()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_sampling_decodes_on_cuda(dtype):
    """decode(encode(v)) == v: within 1e-3 in float32. In bf16 a network input that decode rebuilds a
    hair off can round to the neighbouring bf16 value, and the pixel then moves by up to ~0.3 of a level
    (seen on an H200: 0.26 at one pixel, ~1e-5 elsewhere): within half a level, and rarely."""
    model, images = _model_and_images()
    model.cuda().set_autocast(dtype)
    with torch.no_grad():
        v = images.cuda().float() + torch.rand(images.shape, device="cuda")
        z, _ = model.encode(v)
        error = (model.decode(z) - v).abs()
    if dtype is None:
        assert error.max() < 1e-3
    else:
        assert error.max() < 0.5 and (error > 1e-3).float().mean() < 0.01, (error.max(), error.mean())
    samples = model.sample(8, temperature=0.8)
    assert samples.device.type == "cuda" and samples.dtype == torch.uint8 and samples.shape == images.shape
    seeded = model.sample(8, generator=torch.Generator().manual_seed(0))  # a CPU generator: as the README's
    assert seeded.device.type == "cuda" and torch.equal(
        seeded, model.sample(8, generator=torch.Generator().manual_seed(0))
    )


def test_compiled_networks_give_the_eager_result_on_cuda():
    """inductor (Triton kernels) against eager: log_prob in eval mode, a training step's gradients, and
    samples from the same noise (the mixture's inverse then runs compiled for any number of rows)."""
    eager, images = _model_and_images()
    eager.cuda()
    compiled = copy.deepcopy(eager)
    compiled.compile_networks()
    x = images.cuda()
    results = []
    for model in (eager, compiled):
        torch.manual_seed(0)
        with torch.no_grad():
            lp = model.eval().log_prob(x)
        model.train()
        torch.manual_seed(0)
        (-model.log_prob(x).mean()).backward()
        results.append((lp, [p.grad for p in model.parameters()]))
    (lp_e, grads_e), (lp_c, grads_c) = results
    assert torch.allclose(lp_c, lp_e, rtol=1e-4)
    names = [name for name, _ in eager.named_parameters()]
    for name, g_e, g_c in zip(names, grads_e, grads_c, strict=True):
        assert torch.allclose(g_c, g_e, rtol=1e-2, atol=1e-4), name
    samples = [m.sample(8, generator=torch.Generator().manual_seed(0)).int() for m in (eager, compiled)]
    moved = (samples[1] - samples[0]).abs()  # a level at the most, where a value lies on a rounding edge
    assert moved.max() <= 1 and (moved > 0).float().mean() < 0.01, (moved.max(), moved.float().mean())
