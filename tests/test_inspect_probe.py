"""`flowspec inspect --probe`: per-step log-dets that add up to the model's, inversion errors, data."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SPECS

import flowspec
from flowspec.cli.app import run
from flowspec.inspection import inspect_model
from flowspec.inspection.probe import probe_images, record_steps, run_probe

SMALL = ("defaults.coupling.filters=8", "defaults.coupling.components=4", "data.shape=3x8x8")


@pytest.fixture(scope="module")
def small():
    """A shrunk flowpp_cifar (3x8x8, 8 filters), initialised once for the module (init is the slow part)."""
    spec = flowspec.load_spec(SPECS / "flowpp_cifar.flow", overrides=SMALL)
    torch.manual_seed(0)
    model = flowspec.build(spec)
    model.initialize(torch.randint(0, 256, (8, *spec.data.shape)))
    return spec, model


def test_step_logdets_sum_to_the_model_logdet(small):
    spec, model = small
    report = inspect_model(model, spec, measure=False)
    images = torch.randint(0, 256, (4, *spec.data.shape))
    model.eval()
    v = images + torch.rand(images.shape)
    leaves = {row.path for row in report.branch("flow").walk() if row.leaf}
    with torch.no_grad(), record_steps(model, leaves) as records:
        _, logdet = model.encode(v)
    assert leaves <= set(records.logdet) and leaves <= set(records.inverse_error)
    total = sum(records.logdet[path] for path in leaves if path in records.logdet)
    torch.testing.assert_close(total, logdet.double(), rtol=1e-6, atol=1e-3)
    assert max(records.inverse_error.values()) < 1e-3


def test_probe_fills_every_step_and_sums(small):
    spec, model = small
    report = inspect_model(model, spec, measure=False)
    images, source = probe_images(spec, 4, None)  # initialised on 32 (up to init_batch), as a run would
    assert images.shape == (32, 3, 8, 8) and images.dtype == torch.int64 and int(images.max()) < 256
    run_probe(model, spec, report, images, source, 4)
    probe = report.probe
    assert probe is not None and probe.batch == 4 and source == "random images"
    flow_leaves = [row for row in report.branch("flow").walk() if row.leaf]
    assert all(row.logdet_bpd is not None and row.inverse_error is not None for row in flow_leaves)
    assert probe.logdet_bpd == pytest.approx(sum(row.logdet_bpd for row in flow_leaves))
    # containers show the sum of their steps
    split = next(row for row in report.branch("flow").rows if row.kind == "split")
    assert split.logdet_bpd == pytest.approx(sum(r.logdet_bpd for r in split.walk() if r.leaf))
    assert split.inverse_error == max(r.inverse_error for r in split.walk() if r.leaf)  # shown at --depth 1
    assert probe.max_inverse_error < 1e-3 and math.isfinite(probe.bpd)
    assert "kept for backward (measured per image at batch 4 and scaled)" in report.footer.memory_note


def test_probe_cli_on_real_data(capsys, cifar10_dir):
    code = run(
        [
            "inspect",
            str(SPECS / "quickstart.flow"),
            "--set",
            "data.dataset=cifar10",
            "--set",
            "data.shape=3x32x32",
        ]
        + [
            "--set",
            "data.levels=256",
            "--probe",
            "--data",
            str(cifar10_dir),
            "--batch",
            "2",
            "--format",
            "json",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["probe"]["batch"] == 2 and "test images from" in doc["probe"]["data"]
    steps = [s for s in doc["steps"] if s["leaf"] and s["branch"] == "flow"]
    assert all(s["logdet_bpd"] is not None for s in steps)


def test_probe_missing_data_exit_2(capsys, tmp_path):
    code = run(["inspect", str(SPECS / "quickstart.flow"), "--probe", "--data", str(tmp_path / "nowhere")])
    _, err = capsys.readouterr()
    assert code == 2 and "nowhere" in err and "Traceback" not in err


@pytest.mark.parametrize("option", [["--batch", "4"], ["--data", "x"], ["--threads", "1"], ["--allow-large"]])
def test_probe_options_without_probe_are_refused(option, capsys):
    assert run(["inspect", str(SPECS / "quickstart.flow"), *option]) == 2
    name = option[0]
    assert (
        capsys.readouterr().err == f"error: {name} is only used with --probe: add --probe, or drop {name}\n"
    )


def test_probe_needs_two_images(capsys):
    assert run(["inspect", str(SPECS / "quickstart.flow"), "--probe", "--batch", "1"]) == 2
    err = capsys.readouterr().err
    assert "Invalid value for '--batch': Input should be greater than or equal to 2" in err


def test_probe_on_a_test_split_of_one_image_is_refused(tmp_path, capsys, monkeypatch):
    import numpy as np
    from PIL import Image

    monkeypatch.setenv("FLOWSPEC_CACHE_DIR", str(tmp_path / "cache"))
    for split, count in (("train", 3), ("test", 1)):
        (tmp_path / "imgs" / split / "a").mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(
                tmp_path / "imgs" / split / "a" / f"{i}.png"
            )
    spec = tmp_path / "f.flow"
    spec.write_text(
        "model f\ndata folder { shape 1x8x8 }\n"
        "flow { split checkerboard { coupling(filters=4, blocks=1, heads=2) } }\n"
    )
    assert run(["inspect", str(spec), "--probe", "--data", str(tmp_path / "imgs")]) == 2
    assert "the probe initialises on 2 test images or more, and" in capsys.readouterr().err


def test_a_probe_too_large_for_the_machine_asks_for_a_smaller_batch(monkeypatch, capsys):
    from flowspec import devices

    monkeypatch.setattr(devices, "device_memory", lambda device="cpu": 10**6)  # above quickstart's weights
    assert run(["inspect", str(SPECS / "quickstart.flow"), "--probe", "--batch", "4096"]) == 2
    err = capsys.readouterr().err
    assert (
        "and 4,096 images" in err
        and "Take fewer images at once (--batch)" in err
        and "train.batch" not in err
    )
