"""The shipped Flow++ specs compile to the official model: golden parameter counts (the official models
beyond CIFAR-10: tests/test_official.py), and the full-size flowpp_cifar runs a forward and backward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import SPECS

import flowspec
from flowspec import load_spec

GOLDEN = {
    "flowpp_cifar.flow": 31_443_440,
    "ablations/uniform_dequant.flow": 32_324_408,
    "ablations/affine_coupling.flow": 32_045_708,
    "ablations/no_attention.flow": 31_443_440,
}


@pytest.fixture(scope="module")
def flowpp():
    torch.manual_seed(0)
    return flowspec.build(load_spec(SPECS / "flowpp_cifar.flow"))


def test_flowpp_cifar_parameter_counts(flowpp):
    assert flowpp.count_parameters() == {
        "total": 31_443_440,
        "flow": 27_976_464,
        "dequantizer": 3_466_976,
        "context": 167_936,
    }
    first_coupling = flowpp.flow.layers[0].body.layers[2]
    assert first_coupling.spec_path == "flow.0.body.0.body.2"
    assert sum(p.numel() for p in first_coupling.parameters()) == 2_805_990


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_parameter_counts(name):
    spec = load_spec(SPECS / name)
    model = flowspec.build(spec, "meta")
    assert model.count_parameters()["total"] == GOLDEN[name] == spec.target_params


def test_no_attention_builds_gated_nin_where_flowpp_has_attention():
    """The ablation's count equals Flow++'s (the gated NIN's two 1x1 convs are shaped like attention's
    q/k/v and output projections), so the modules themselves are checked."""
    kinds = {}
    for name in ("flowpp_cifar.flow", "ablations/no_attention.flow"):
        model = flowspec.build(load_spec(SPECS / name), "meta")
        kinds[name] = [
            type(m).__name__
            for m in model.flow.modules()
            if type(m).__name__ in ("GatedAttention", "GatedNIN")
        ]
    attention, nin = kinds["flowpp_cifar.flow"], kinds["ablations/no_attention.flow"]
    assert (
        len(attention) == len(nin) > 0 and set(attention) == {"GatedAttention"} and set(nin) == {"GatedNIN"}
    )


def test_flowpp_cifar_forward_and_backward(flowpp):
    x = torch.randint(0, 256, (8, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    flowpp.initialize(x)
    flowpp.train()
    bpd = flowpp.bpd(x[:2])
    assert bpd.shape == (2,) and torch.isfinite(bpd).all()
    print(bpd)
    loss = bpd.mean()
    assert 4.0 < loss.item() < 16.0  # an initialised, untrained model on uniform noise images
    loss.backward()
    grads = [p.grad for p in flowpp.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
