"""The Python API (`flowspec.train`, `flowspec.load`), `flowspec export` and its round trips, TensorBoard."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_spec, write_flow

import flowspec
from flowspec.cli.app import run
from flowspec.errors import UserError
from flowspec.train.checkpoint import ema_weights, load_checkpoint
from flowspec.train.data import load_split
from flowspec.train.tensorboard import TensorBoard


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    result = flowspec.train(
        tiny_spec(steps=3, eval_every=3), out=out, device="cpu", quiet=True, tensorboard=True
    )
    assert result.step == 3 and result.run_dir == out
    return out


def _log_prob(model, x):
    torch.manual_seed(0)  # the same dequantization noise for every model
    with torch.no_grad():
        return model.log_prob(x)


def test_load_gives_the_ema_model_ready_to_use(run_dir):
    model = flowspec.load(run_dir)
    assert isinstance(model, flowspec.FlowModel) and not model.training
    assert model.spec == tiny_spec(steps=3, eval_every=3)
    payload = load_checkpoint(run_dir)
    ema = {k.removeprefix("module."): v for k, v in payload["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(ema[k], v) for k, v in model.state_dict().items())  # the EMA's, by the file
    assert not all(torch.equal(payload["model"][k], v) for k, v in model.state_dict().items())  # not the raw
    assert ema_weights(payload).keys() == ema.keys()
    assert flowspec.load(run_dir / "last.pt").state_dict().keys() == model.state_dict().keys()


def test_export_round_trips_to_identical_log_likelihoods(run_dir, tmp_path, capsys):
    exported = tmp_path / "tiny.safetensors"
    assert run(["export", str(run_dir), "-o", str(exported)]) == 0
    assert "wrote tiny (step 3" in capsys.readouterr().out
    x = load_split(tiny_spec().data, "test").images[:32]
    original, loaded = flowspec.load(run_dir), flowspec.load(exported)
    assert loaded.spec == original.spec and not loaded.training
    assert torch.equal(_log_prob(original, x), _log_prob(loaded, x))
    # eval and sample take the export too
    assert (
        run(["eval", str(exported), "--limit", "16", "--device", "cpu", "--out", str(tmp_path / "e.json")])
        == 0
    )
    assert run(["sample", str(exported), "-n", "4", "-o", str(tmp_path / "s.png"), "--device", "cpu"]) == 0
    assert (tmp_path / "e.json").is_file() and (tmp_path / "s.png").is_file()


def test_export_errors(run_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    with pytest.raises(UserError, match="does not exist"):
        flowspec.load(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="other.safetensors is not a flowspec export"):
        flowspec.load(tmp_path / "other.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x01" * 64)
    with pytest.raises(UserError, match="garbage.safetensors is not a readable .safetensors file"):
        flowspec.load(tmp_path / "garbage.safetensors")
    for argv in (
        ["export", str(tmp_path / "nowhere")],
        ["export", str(run_dir), "-o", str(tmp_path / "model.pt")],
        ["sample", str(tmp_path / "garbage.safetensors")],
    ):
        assert run(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err


def test_a_damaged_or_edited_export_is_refused_naming_it(run_dir, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    exported = tmp_path / "good.safetensors"
    assert run(["export", str(run_dir), "-o", str(exported)]) == 0
    with safe_open(str(exported), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(exported)
    name = next(iter(tensors))
    flipped = {**tensors, name: tensors[name] + 1}
    cases = {
        "flipped.safetensors": (flipped, metadata, "is corrupt: its tensors do not match the checksum"),
        "step.safetensors": (tensors, {**metadata, "step": "abc"}, "its step is 'abc', not a number"),
        "fp16.safetensors": (tensors, {**metadata, "precision": "fp16"}, "its precision is 'fp16', not fp32"),
    }
    for file, (weights, meta, message) in cases.items():
        save_file(weights, tmp_path / file, metadata=meta)
        with pytest.raises(UserError, match=f"{file} {message}" if "corrupt" in message else message):
            flowspec.load(tmp_path / file)
    unchecked = {k: v for k, v in metadata.items() if k != "checksum"}  # an export from before checksums
    save_file(tensors, tmp_path / "old.safetensors", metadata=unchecked)
    capsys.readouterr()
    assert flowspec.load(tmp_path / "old.safetensors").spec == flowspec.load(exported).spec
    assert "old.safetensors has no checksum" in capsys.readouterr().err
    (tmp_path / "folder.safetensors").mkdir()
    assert run(["export", str(run_dir), "-o", str(tmp_path / "folder.safetensors")]) == 2
    assert "folder.safetensors is a folder: give a file name" in capsys.readouterr().err


def test_an_export_whose_step_or_image_count_is_not_ascii_digits_is_refused(run_dir, tmp_path):
    """`str.isdigit` accepts "²" and 5,000 nines, which `int` refuses: the export is refused, naming it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    exported = tmp_path / "good.safetensors"
    assert run(["export", str(run_dir), "-o", str(exported)]) == 0
    with safe_open(str(exported), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(exported)
    for key in ("step", "train_images"):
        for value in ("\u00b2", "9" * 5000, "-1", ""):
            save_file(tensors, tmp_path / "edited.safetensors", metadata={**metadata, key: value})
            with pytest.raises(
                UserError, match=f"edited.safetensors is not a valid flowspec export: its {key}"
            ):
                flowspec.load(tmp_path / "edited.safetensors")
    assert run(["sample", str(tmp_path / "edited.safetensors"), "-o", str(tmp_path / "s.png")]) == 2
    assert not (tmp_path / "s.png").exists()


def _file_size_limit(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ


@pytest.mark.parametrize("command", ["sample", "export"])
def test_a_full_disk_keeps_the_old_sample_grid_or_export_and_exits_2(run_dir, tmp_path, command):
    """A write cut short (a full disk; here a file-size limit, EFBIG) is an error naming the file, and the
    file it was to replace is kept: Pillow's JPEG encoder and safetensors' writer miss or hide it."""
    out = tmp_path / ("grid.jpg" if command == "sample" else "model.safetensors")
    out.write_bytes(b"the good old file")
    argv = [sys.executable, "-m", "flowspec", command, str(run_dir), "-o", str(out)]
    argv += ["-n", "64", "--seed", "0", "--device", "cpu"] if command == "sample" else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=root,
        env=env,
        preexec_fn=_file_size_limit(4096),
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(f"error: file too large writing {out} (a file-size limit")
    assert out.read_bytes() == b"the good old file" and os.listdir(tmp_path) == [out.name]


def test_train_from_python_takes_a_spec_file_and_the_command_line_options(tmp_path):
    flow = write_flow(tmp_path / "tiny.flow", steps=4, eval_every=2)
    out = tmp_path / "run"
    result = flowspec.train(
        flow, out=out, sets=["train.lr=1e-3"], device="cpu", max_steps=2, quiet=True, tensorboard=True
    )
    assert (result.stopped, result.step) == ("max-steps", 2) and load_checkpoint(out)["step"] == 2
    resumed = flowspec.train(resume=out, quiet=True, device="cpu", tensorboard=True)
    assert (resumed.stopped, resumed.step) == ("finished", 4)
    assert flowspec.load(out).spec.train.lr == 1e-3
    assert [e.step for e in _scalars(out, "test/bpd")] == [2, 4]  # the resumed run continues the log
    with pytest.raises(UserError, match="no spec given"):
        flowspec.train()
    with pytest.raises(UserError, match="expected a duration"):
        flowspec.train(flow, out=tmp_path / "x", max_time="soon")
    with pytest.raises(UserError, match="--data-memory: expected a size like 512M or 4G, got 'lots'"):
        flowspec.train(flow, out=tmp_path / "x", data_memory="lots")
    for log_every in (0, 2.5, True):  # a fraction trained, and its checkpoints could not be resumed
        message = f"log_every must be a whole number of steps >= 1, got {log_every}$"
        with pytest.raises(UserError, match=message):
            flowspec.train(flow, out=tmp_path / "x", log_every=log_every)
    assert not (tmp_path / "x").exists()


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    return events


def _scalars(run_dir, tag):
    return _events(run_dir).Scalars(tag)


def test_tensorboard_has_the_scalars_and_the_sample_grids(run_dir):
    events = _events(run_dir)
    tags = events.Tags()
    assert {"test/bpd", "train/bpd", "run/inversion_error", "run/lr"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("test/bpd")] == [3]
    assert {"samples/T=1.0", "samples/T=0.8"} <= set(tags["images"])


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"pip install 'flowspec\[tensorboard\]'"):
        TensorBoard(tmp_path)
    flow = write_flow(tmp_path / "tiny.flow")
    assert run(["train", str(flow), "--out", str(tmp_path / "run"), "--device", "cpu", "--tensorboard"]) == 2
    assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err


def test_a_run_of_a_spec_that_files_may_no_longer_say_still_loads(tmp_path):
    """Rules for spec files (the model name a word, init_batch >= 2) are not applied to the specs stored
    in checkpoints, so runs made before them load; a name that cannot name a folder needs --out."""
    spec = tiny_spec(steps=2, eval_every=2).model_copy(update={"name": "quick-start v2"})
    with pytest.raises(UserError, match=r"the model name 'quick-start v2' cannot name a run folder: give"):
        flowspec.train(spec, quiet=True)
    flowspec.train(spec, out=tmp_path / "run", quiet=True)
    assert flowspec.load(tmp_path / "run").spec.name == "quick-start v2"
    with pytest.raises(flowspec.UserError, match=r"init_batch must be >= 2 \(the data-dependent init"):
        flowspec.parse_spec("model m\nflow { squeeze }\ntrain { init_batch 1 }\n")


def test_set_on_a_run_whose_spec_files_may_no_longer_say_it(tmp_path, capsys):
    spec = tiny_spec(steps=2, eval_every=2).model_copy(update={"name": "my-model"})
    flowspec.train(spec, out=tmp_path / "run", quiet=True)
    grid = tmp_path / "g.png"
    assert run(["sample", str(tmp_path / "run"), "-n", "4", "-o", str(grid), "--set", "data.classes=3"]) == 2
    err = capsys.readouterr().err  # the model is unconditional: a class would change nothing
    assert "sample reads only the model name (it names the grid) of the spec stored in" in err
    assert err.rstrip().endswith(
        "so data.classes would change nothing here; samples come from the model alone"
    )
    assert run(["sample", str(tmp_path / "run"), "-n", "4", "-o", str(grid)]) == 0
    assert grid.is_file() and "wrote 4 samples of my-model" in capsys.readouterr().out
    out = str(tmp_path / "e.json")
    assert run(["eval", str(tmp_path / "run"), "--set", "data.classes=3", "--limit", "8", "-o", out]) == 0
    assert capsys.readouterr().out.startswith("my-model, step 2")  # the stored name, put back
    assert run(["sample", str(tmp_path / "run"), "-n", "4", "-o", str(grid), "--set", "model=renamed"]) == 0
    assert "wrote 4 samples of renamed" in capsys.readouterr().out
    assert run(["sample", str(tmp_path / "run"), "-n", "4", "-o", str(grid), "--set", 'model="a b"']) == 2
    assert (
        "--set:1:1: the model name must be a word" in capsys.readouterr().err
    )  # what --set writes is checked


def test_a_stored_spec_with_settings_made_unused_by_a_set_still_loads(tmp_path, capsys):
    """A base's step setting that a --set made unused is allowed in training; the stored spec, one file
    now, writes it on the step beside the kind that makes it unused, and must load all the same."""
    flow = tmp_path / "base.flow"
    text = write_flow(flow).read_text()
    flow.write_text(text.replace("norm; pointwise; coupling;", "coupling(components=3);"))
    run_dir = tmp_path / "run"
    sets = ["flow.0.body.0.body.0.coupling=affine"]
    flowspec.train(flow, sets=sets, out=run_dir, max_steps=1, quiet=True, eval={"samples": 0})
    out = tmp_path / "e.json"
    assert run(["eval", str(run_dir), "--set", "data.classes=3", "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["images"] > 0


def test_a_spec_made_in_python_starts_no_run_that_a_spec_file_could_not(tmp_path):
    """The rules of spec files (here: a sigmoid in the flow, a class named twice) hold for a FlowSpec made
    in Python too; only a checkpoint's stored spec from before a rule is spared them."""
    from flowspec.steps.sigmoid import SigmoidStep

    spec = tiny_spec(steps=1)
    sigmoid = spec.model_copy(update={"flow": [*spec.flow, SigmoidStep()]})
    with pytest.raises(flowspec.UserError, match="sigmoid belongs at the end of the variational dequantizer"):
        flowspec.train(sigmoid, out=tmp_path / "a", quiet=True)
    twice = spec.model_copy(update={"data": spec.data.model_copy(update={"classes": (3, 3)})})
    with pytest.raises(flowspec.UserError, match=r"cannot start a run: classes names class 3 twice"):
        flowspec.train(twice, out=tmp_path / "b", quiet=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_signal_during_train_is_raised_to_the_caller_after_saving(tmp_path, monkeypatch):
    """A loop of runs in a script or notebook stops at Ctrl-C (it went on to the next run): after the save,
    `train` raises `RunStopped`, a KeyboardInterrupt holding the run's result."""
    import os
    import signal

    from flowspec.errors import RunStopped
    from flowspec.train.checkpoint import load_checkpoint
    from flowspec.train.update import Updater

    step = Updater.__call__

    def interrupted_at_step_two(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Updater, "__call__", interrupted_at_step_two)
    with pytest.raises(RunStopped) as stop:
        flowspec.train(tiny_spec(steps=6), out=tmp_path / "run", quiet=True, device="cpu")
    assert isinstance(stop.value, KeyboardInterrupt)
    assert (stop.value.result.stopped, stop.value.result.step) == ("SIGINT", 2)
    assert load_checkpoint(tmp_path / "run")["step"] == 2


def test_a_spec_changed_in_python_is_validated_before_it_trains(tmp_path):
    """`model_copy(update=...)`, pydantic's way to vary a spec, skips validation: train validates again."""
    spec = tiny_spec()
    bad = spec.model_copy(update={"train": spec.train.model_copy(update={"batch": -5, "lr": "x"})})
    with pytest.raises(
        UserError, match=r"the spec 'tiny' is not valid: train.lr: .*\(got 'x'\); train.batch"
    ):
        flowspec.train(bad, out=tmp_path / "run", quiet=True, device="cpu")
    assert not (tmp_path / "run").exists()
    with pytest.raises(TypeError, match=r"overrides are a list of KEY=VALUE strings, .* got None"):
        flowspec.train(write_flow(tmp_path / "t.flow"), sets=None)


def test_a_spec_changed_in_python_whose_shapes_do_not_fit_is_a_user_error(tmp_path):
    """build and train check the steps against the data shape as load_spec does: a UserError, not the
    builder's ShapeError."""
    spec = flowspec.load_spec(Path(__file__).parents[1] / "specs" / "quickstart.flow")
    bad = spec.model_copy(update={"data": spec.data.model_copy(update={"shape": (1, 7, 7)})})
    fit = (
        r"the spec 'quickstart' does not fit its data shape 1x7x7: flow.0: .*; flow.1: squeeze needs an even"
    )
    with pytest.raises(UserError, match=fit):
        flowspec.build(bad)
    with pytest.raises(UserError, match=fit):
        flowspec.train(bad, out=tmp_path / "run", max_steps=1, quiet=True, device="cpu")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a CUDA device")
def test_build_on_a_missing_cuda_device_says_so():
    with pytest.raises(UserError, match="cuda was requested but no CUDA device is available"):
        flowspec.build(tiny_spec(), "cuda")


def test_tensorboard_leaves_out_a_stop_evaluation_that_training_went_past(tmp_path):
    """As metrics.jsonl does; the latest train bits/dim at that step stays (logged again)."""
    spec, out = tiny_spec(steps=4, eval_every=2), tmp_path / "run"
    flowspec.train(spec, out=out, device="cpu", max_steps=3, quiet=True, tensorboard=True, log_every=1)
    flowspec.train(resume=out, device="cpu", quiet=True, tensorboard=True, log_every=1)
    flowspec.train(spec, out=tmp_path / "straight", device="cpu", quiet=True, tensorboard=True, log_every=1)
    assert [e.step for e in _scalars(out, "test/bpd")] == [2, 4]
    latest = [(e.step, e.value) for e in _scalars(out, "train/bpd_latest")]
    assert latest == [(e.step, e.value) for e in _scalars(tmp_path / "straight", "train/bpd_latest")]
    assert [step for step, _ in latest] == [1, 2, 3, 4]
