"""Recomputation in the backward pass (`--recompute`): keeping every activation gives the same
gradients, `auto` chooses by device, compilation and memory, and the run header says what it chose."""

from __future__ import annotations

import pytest
import torch
from conftest import SPECS
from train_helpers import tiny_spec as train_spec

import flowspec
from flowspec import devices
from flowspec.errors import UserError
from flowspec.inspection import budget
from flowspec.inspection.memory import STEP_TEMPORARIES
from flowspec.layers.networks import FlowppBlock
from flowspec.train.recompute import check_training, resolve_recompute
from flowspec.train.trainer import RunOptions, Trainer
from flowspec.units import fmt_bytes

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
SMALL = (
    "data.shape=3x8x8",
    "defaults.coupling.filters=8",
    "defaults.coupling.blocks=2",
    "defaults.coupling.components=2",
    "defaults.coupling.heads=2",
    "dequantize.context.filters=4",
)


def _gradients(model: flowspec.FlowModel, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(1)
    model.bpd(x).mean().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_keeping_every_activation_gives_the_recomputed_gradients_in_float64():
    """Flow++ with attention, dropout and the variational dequantizer: the same gradients either way."""
    spec = flowspec.load_spec(SPECS / "flowpp_cifar.flow", overrides=SMALL)
    assert spec.defaults.coupling.dropout > 0
    torch.manual_seed(0)
    model = flowspec.build(spec).double()
    x = torch.randint(0, 256, (4, *spec.data.shape))
    model.initialize(x)
    model.train()
    blocks = [m for m in model.modules() if isinstance(m, FlowppBlock)]
    assert blocks and all(b.recompute for b in blocks)
    recomputed = _gradients(model, x)
    model.set_recompute(False)
    assert not any(b.recompute for b in blocks)
    kept = _gradients(model, x)
    assert len(kept) == len(recomputed) > 0
    for a, b in zip(recomputed, kept, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_explicit_choices_pass_through_and_unknown_ones_are_refused():
    spec = train_spec(steps=1)
    assert resolve_recompute("on", CUDA, False, spec) == (True, "")
    assert resolve_recompute("off", CPU, False, spec) == (False, "")
    with pytest.raises(UserError, match="unknown --recompute 'sometimes': use auto, on, off"):
        resolve_recompute("sometimes", CPU, False, spec)


def test_auto_keeps_activations_when_eager_with_room(monkeypatch):
    spec = train_spec(steps=1)
    assert resolve_recompute("auto", CUDA, True, spec) == (
        True,
        "auto: compiled, the recomputation is traced once",
    )
    keeping = budget.measure(spec).train
    for device, share in ((CUDA, 0.8), (CPU, 0.5)):
        memory = int(keeping * 4.5 / share)  # room for its activations 4.5 times over
        monkeypatch.setattr(devices, "device_memory", lambda device, memory=memory: memory)
        keep, why = resolve_recompute("auto", device, False, spec)
        assert not keep and why.startswith("auto: keeping every activation fits (~"), device
        monkeypatch.setattr(devices, "device_memory", lambda device, share=share: int(keeping * 0.9 / share))
        keep, why = resolve_recompute("auto", device, False, spec)
        assert keep and why.startswith("auto: keeping every activation would need ~"), device


def test_the_processes_of_a_torchrun_job_on_one_machine_share_its_ram(monkeypatch):
    """--recompute auto and the size check both see a process's share of the RAM."""
    monkeypatch.setattr(devices, "HELD_AT_IMPORT", (0, 0))  # nothing resident yet
    alone = devices.device_memory(CPU)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert devices.device_memory(CPU) == alone // 4  # no address-space limit below that here
    spec = flowspec.load_spec(SPECS / "flowpp_cifar.flow", ["train.batch=8"])
    need = budget.measure(spec).train
    monkeypatch.setattr(
        devices.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096}.get(name, need // 4096 * 2)
    )
    with pytest.raises(UserError, match=r"of cpu memory \(its share: 4 processes on this machine\)"):
        budget.check_size(spec, "train", CPU)  # twice its need on the machine, half of it a process


@pytest.mark.parametrize(
    ("option", "header"),
    [("auto", "recompute off (auto: keeping every activation fits"), ("on", "recompute on,")],
)
def test_the_run_header_says_what_was_chosen_and_the_model_follows(tmp_path, capsys, option, header):
    trainer = Trainer(train_spec(steps=1), RunOptions(out=tmp_path / "run", recompute=option, quiet=False))
    blocks = [m for m in trainer.updater.model.modules() if isinstance(m, FlowppBlock)]
    assert {b.recompute for b in blocks} == {option == "on"}
    trainer.run()
    assert header in capsys.readouterr().out


def test_compile_on_a_cpu_fuses_elementwise_chains_and_recomputes_as_eager(tmp_path, monkeypatch):
    """On a CPU, --compile compiles only elementwise chains (whole networks were slower than eager), of the
    trained model and of its EMA (the evaluations), so `auto` still keeps every activation where that
    fits; on a GPU it compiles whole networks and recomputes."""
    fused = []
    monkeypatch.setattr(
        flowspec.FlowModel, "fuse_elementwise", lambda self, b="inductor": fused.append((self, b))
    )
    trainer = Trainer(train_spec(steps=1), RunOptions(out=tmp_path / "run", compile=True))
    updater = trainer.updater
    assert fused == [(updater.model, "inductor"), (updater.ema.module, "inductor")]
    assert not trainer.recompute and trainer.recompute_reason.startswith("auto: keeping every activation")
    assert all(c.network._compiled_call_impl is None for c in updater.model.couplings())


def test_auto_sizes_one_process_share_of_the_batch(monkeypatch):
    """Under torchrun each of `world` processes holds batch / world images (over `accumulate`)."""
    spec = train_spec(steps=1)
    size = budget.measure(spec)
    alone, shared = (
        budget.training_bytes(size, spec, world)
        + 1.5 * size.per_image * budget.images_per_process(spec, world)
        for world in (1, 4)
    )
    assert budget.images_per_process(spec, 4) == spec.train.batch // 4 and shared < alone
    monkeypatch.setattr(devices, "device_memory", lambda device: int((alone + shared) / 2 / 0.8))
    assert resolve_recompute("auto", CUDA, False, spec)[0]
    assert not resolve_recompute("auto", CUDA, False, spec, world=4)[0]


def test_the_training_check_uses_the_recompute_and_precision_the_run_will(tmp_path, monkeypatch):
    """flowpp_cifar at batch 200 keeping every activation needs ~4x what it needs recomputing: a machine
    with room for the second only refuses --recompute off (the check used to count --recompute on, fp32)."""
    spec = flowspec.load_spec(SPECS / "flowpp_cifar.flow", ["train.batch=200"])
    size = budget.measure(spec)
    on, off, off_bf16 = (
        budget.training_bytes(size, spec, recompute=r, precision=p)
        for r, p in ((True, "fp32"), (False, "fp32"), (False, "bf16"))
    )
    assert off > off_bf16 > 1.1 * on
    monkeypatch.setattr(devices, "device_memory", lambda device="cpu": int(1.1 * on))
    for recompute in ("on", "auto"):
        check_training(spec, "cpu", False, None, recompute, False)
    with pytest.raises(UserError, match=r"training step's peak with --recompute off in fp32") as refused:
        check_training(spec, "cpu", False, None, "off", False)
    assert "x4.7 at the backward pass's peak" in str(refused.value)  # the terms of what was checked
    assert "--recompute on:" not in str(refused.value)
    with pytest.raises(UserError, match=r"peak with --recompute off in bf16"):
        check_training(spec, "cpu", False, "bf16", "off", False)
    check_training(spec, "cpu", True, "fp32", "off", False)  # --allow-large
    with pytest.raises(UserError, match="--recompute off in fp32"):
        flowspec.train(spec, out=tmp_path / "run", recompute="off")
    assert not (tmp_path / "run").exists()


def test_a_resumed_runs_unknown_precision_is_checked_in_both(monkeypatch):
    """A large model at a small batch needs more in bf16 (a copy of the weights) than in fp32: a resumed
    run, whose precision is read later from its checkpoint, is checked against the larger."""
    spec = flowspec.load_spec(SPECS / "imagenet32.flow", ["train.batch=1"])
    size = budget.measure(spec)
    fp32, bf16 = (budget.training_bytes(size, spec, precision=p) for p in ("fp32", "bf16"))
    assert bf16 > fp32
    monkeypatch.setattr(devices, "device_memory", lambda device="cpu": (fp32 + bf16) // 2)
    check_training(spec, "cpu", False, "fp32", "on", False)
    with pytest.raises(UserError, match=r"peak with --recompute on in bf16 \(.*optimizer step's temporaries"):
        check_training(spec, "cpu", False, None, "on", False)


def test_what_the_process_allocates_after_import_is_left_to_the_estimate():
    """The memory a run holds (its model, data, a resumed checkpoint) is in its estimate: `--recompute auto`,
    decided after the model is built, does not count it a second time."""
    before = devices.device_memory("cpu")
    held = torch.ones(2**27)  # 512 MiB, touched
    assert devices.device_memory("cpu") == before and held.sum() == 2**27


def test_a_bf16_run_keeps_its_activations_where_they_fit_in_bf16_only(tmp_path, monkeypatch):
    """`auto` sizes the run in the precision it trains in: keeping every activation needs less in bf16."""
    spec = train_spec(steps=1)
    size = budget.measure(spec)
    off, off_bf16 = (
        budget.training_bytes(size, spec, recompute=False, precision=p) for p in ("fp32", "bf16")
    )
    assert off_bf16 < off
    memory = int((off + off_bf16) / 2 / 0.5)  # half the RAM holds the bf16 run's, not the fp32 run's
    monkeypatch.setattr(devices, "device_memory", lambda device="cpu": memory)
    for precision, recomputes in (("bf16", False), ("fp32", True)):
        options = RunOptions(out=tmp_path / precision, device="cpu", precision=precision)
        assert Trainer(spec, options).recompute is recomputes, precision


def test_the_api_checks_a_bf16_run_in_bf16(tmp_path, monkeypatch):
    """A large model at a small batch needs more in bf16 than in fp32: `flowspec.train(precision="bf16")`
    is refused where only the fp32 run would fit."""
    spec = flowspec.load_spec(SPECS / "imagenet32.flow", ["train.batch=1"])
    size = budget.measure(spec)
    fp32, bf16 = (budget.training_bytes(size, spec, precision=p) for p in ("fp32", "bf16"))
    monkeypatch.setattr(devices, "device_memory", lambda device="cpu": (fp32 + bf16) // 2)
    with pytest.raises(UserError, match="--recompute on in bf16"):
        flowspec.train(spec, out=tmp_path / "run", precision="bf16", recompute="on", device="cpu")
    assert not (tmp_path / "run").exists()


def test_the_size_check_counts_one_torchrun_process_share_of_the_batch(monkeypatch):
    """Each of WORLD_SIZE processes holds batch / WORLD_SIZE images: the need and its terms say so."""
    spec = flowspec.load_spec(SPECS / "flowpp_cifar.flow", ["train.batch=64"])
    size = budget.measure(spec)
    alone, shared = (budget.training_bytes(size, spec, world) for world in (1, 4))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(devices, "device_memory", lambda device="cpu": (alone + shared) // 2)
    budget.check_size(spec, "train")  # one process holds 16 images: fits
    monkeypatch.setattr(devices, "device_memory", lambda device="cpu": shared // 2)
    with pytest.raises(UserError) as refused:
        budget.check_size(spec, "train")
    assert f"{fmt_bytes(shared)} at a training step's peak" in str(refused.value)
    assert f"{fmt_bytes(size.per_image * 16)} activations kept for backward" in str(refused.value)


def test_recomputing_in_bf16_needs_less_than_in_fp32():
    """Measured (bench/RESULTS.md): flowpp_cifar's peak per image recomputing is about half in bf16."""
    spec = flowspec.load_spec(SPECS / "flowpp_cifar.flow", ["train.batch=200"])
    size = budget.measure(spec)
    assert budget.training_bytes(size, spec, precision="bf16") < budget.training_bytes(size, spec)


def test_a_refusal_names_the_bf16_copy_and_the_optimizer_temporaries_in_bytes(monkeypatch):
    spec = flowspec.load_spec(SPECS / "imagenet32.flow", ["train.batch=1"])
    size = budget.measure(spec)
    fp32, bf16 = (budget.training_bytes(size, spec, precision=p) for p in ("fp32", "bf16"))
    monkeypatch.setattr(devices, "device_memory", lambda device="cpu": (fp32 + bf16) // 2)
    with pytest.raises(UserError) as refused:
        check_training(spec, "cpu", False, "bf16", "on", False)
    message = str(refused.value)
    temporaries = fmt_bytes(round(STEP_TEMPORARIES * size.weights))
    assert f"{temporaries} of the optimizer step's temporaries ({STEP_TEMPORARIES:g} x" in message
    assert f"+ {fmt_bytes(size.weights)} bf16 copy of the weights" in message


def test_a_process_that_already_holds_more_than_its_share_can_take_nothing(monkeypatch):
    monkeypatch.setattr(devices, "HELD_AT_IMPORT", (2**62, 2**62))
    assert devices.device_memory(CPU) == 0


def test_outside_torchrun_the_refusal_speaks_of_no_share(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    spec = flowspec.load_spec(SPECS / "quickstart.flow")
    monkeypatch.setattr(devices, "device_memory", lambda device="cpu": 0)
    with pytest.raises(UserError, match=r"this process can still take 0 B of cpu memory\. ") as refused:
        budget.check_size(spec, "train", CPU)
    assert "its share" not in str(refused.value)
