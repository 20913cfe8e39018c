"""The parts of the training loop, each on its own: signals, run folder, metrics window, evaluation,
checkpoint writing, stop agreement, and the optimisation step."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_spec, tiny_updater

import flowspec
from flowspec.errors import UserError
from flowspec.spec import EvalSpec
from flowspec.train import rundir
from flowspec.train.checkpoint import BEST, LAST, save_run, spec_record
from flowspec.train.data import load_split
from flowspec.train.distributed import Dist, agree_to_stop
from flowspec.train.evaluation import Evaluator
from flowspec.train.metrics import METRICS, Window, read_metrics, record
from flowspec.train.signals import StopSignals
from flowspec.train.trainer import RunOptions, Trainer
from flowspec.train.update import Updater

CPU = torch.device("cpu")


@pytest.mark.parametrize("stderr", ["unread pipe", "closed"])
def test_a_signal_announced_to_a_stderr_nobody_reads_is_still_noted(stderr):
    """`train 2>&1 | tee log`, Ctrl-C: the shell's SIGINT ends tee too, and the announcement's write fails
    (EPIPE; `2>&-`: EBADF); the stop must still be noted, so that the step finishes and saves."""
    saved = os.dup(2)
    if stderr == "closed":
        os.close(2)
    else:
        read_end, write_end = os.pipe()
        os.close(read_end)
        os.dup2(write_end, 2)
        os.close(write_end)
    try:
        with StopSignals(announce="finishing the step, then saving") as signals:
            os.kill(os.getpid(), signal.SIGINT)
            assert signals.received == "SIGINT"
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def test_stop_signals_note_the_first_signal_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        assert signals.received is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C interrupts as usual
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before
    with StopSignals(enabled=False) as off:
        assert signal.getsignal(signal.SIGTERM) is before and off.received is None


def test_a_torchrun_worker_takes_a_signal_forwarded_soon_after_its_own_as_the_same_stop(monkeypatch):
    """A scheduler's SIGTERM to every process of a job reaches a worker twice (its own, then torchrun's):
    one stop. A repeat after `ECHO_SECONDS` acts as usual."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # without the window: terminated here
        assert signals.received == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == "SIGINT"
        monkeypatch.setattr(StopSignals, "ECHO_SECONDS", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_the_stop_vote_reads_each_steps_sum_a_step_late():
    """Under torchrun the flags ride on the step's all-reduce (summed over the ranks) and are read after
    the next step, so no step waits for the device."""
    from flowspec.train.distributed import StopVote

    vote = StopVote(CPU)
    assert torch.equal(vote.flags(None, False), torch.zeros(3))
    assert vote.read(torch.zeros(3)) == (None, False)  # nothing before the first step
    flags = vote.flags("SIGINT", False)
    assert vote.read(flags * 2) == (None, False)  # the step before had none
    assert vote.read(torch.tensor([0.0, 1.0, 1.0])) == ("SIGINT", False)  # the previous step's
    assert vote.read(torch.zeros(3)) == ("SIGTERM", True)
    assert torch.equal(vote.flags(None, True), torch.tensor([1.0, 0.0, 1.0]))  # a rank's flags stay set


def test_run_folder(tmp_path, monkeypatch):
    spec = tiny_spec()
    assert rundir.choose(spec, tmp_path / "a", Dist()) == tmp_path / "a"
    monkeypatch.chdir(tmp_path)
    first, second = rundir.choose(spec, None, Dist()), rundir.choose(spec, None, Dist())  # in one second
    assert first.name.startswith("tiny-") and first.is_dir() and second.is_dir() and first != second
    assert rundir.previous_checkpoint(tmp_path / "new", spec, resume=False) is None
    (tmp_path / LAST).write_bytes(b"")
    with pytest.raises(UserError, match="already holds a run"):
        rundir.previous_checkpoint(tmp_path, spec, resume=False)
    with pytest.raises(UserError, match="new/last.pt does not exist"):
        rundir.previous_checkpoint(tmp_path / "new", spec, resume=True)
    rundir.write_spec_files(tmp_path / "run", spec)
    assert json.loads((tmp_path / "run" / "spec.json").read_text())["name"] == "tiny"
    written = (tmp_path / "run" / "spec.flow").read_text()  # a spec built in Python, in the language
    assert (
        written.startswith("# the resolved spec of a trained run\n") and flowspec.parse_spec(written) == spec
    )
    assert rundir.previous_checkpoint(tmp_path / "empty", spec, resume=False) is None
    (tmp_path / "run" / METRICS).write_text('{"step": 1}\n')  # a run stopped before its first checkpoint
    assert rundir.previous_checkpoint(tmp_path / "run", spec, resume=False) is None  # set aside, then new
    (tmp_path / "run" / "notes.txt").write_text("mine")  # anything else: the folder is not only that run's
    with pytest.raises(
        UserError, match=r"run already holds metrics.jsonl, spec.flow, spec.json of an earlier run, with no"
    ):
        rundir.previous_checkpoint(tmp_path / "run", spec, resume=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "spec.flow").write_text("model m\n")  # the user's, not a run's: it would be lost
    with pytest.raises(UserError, match=r"mine/spec.flow exists, and a run writes its resolved spec there"):
        rundir.previous_checkpoint(tmp_path / "mine", spec, resume=False)
    (tmp_path / "grids" / "samples").mkdir(parents=True)  # a grid or a spec.flow would be overwritten
    with pytest.raises(UserError, match=r"grids already holds samples of an earlier run"):
        rundir.previous_checkpoint(tmp_path / "grids", spec, resume=False)


def test_only_a_run_that_never_checkpointed_is_set_aside(tmp_path):
    """A folder is an unstarted run's only with a `spec.json` that is a spec and no checkpoint: a foreign
    spec.json, or a run with a best.pt, is refused and kept as it is, by `train --out` and an ablation
    alike; `eval` on a folder with a best.pt but no last.pt points to it."""
    from flowspec.train import ablate
    from flowspec.train.checkpoint import resolve

    spec = tiny_spec()
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "spec.json").write_text('{"name": "webapp"}')
    rundir.write_spec_files(tmp_path / "best", spec)
    (tmp_path / "best" / BEST).write_bytes(b"")
    (tmp_path / "best" / METRICS).write_text('{"step": 1}\n')
    for folder, held in (("web", "spec.json"), ("best", "best.pt, metrics.jsonl, spec.flow, spec.json")):
        before = sorted(p.name for p in (tmp_path / folder).iterdir())
        assert rundir.unstarted(tmp_path / folder) == [] and ablate._set_aside(tmp_path / folder) == []
        with pytest.raises(UserError, match=f"{folder} already holds {held} of an earlier run, with no"):
            rundir.previous_checkpoint(tmp_path / folder, spec, resume=False)
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == before
    assert not list(tmp_path.glob("*.before-*"))
    with pytest.raises(UserError) as refused:
        resolve(tmp_path / "best")
    assert str(refused.value) == (
        f"no last.pt in {tmp_path / 'best'} (the checkpoint a run resumes from); its best.pt is there: "
        f"`flowspec eval {tmp_path / 'best' / 'best.pt'}` uses it (so do sample and export)"
    )
    with pytest.raises(UserError, match=r"no checkpoint in .*web: expected .*web/last.pt \(a run folder"):
        resolve(tmp_path / "web")
    (tmp_path / "best" / BEST).unlink()  # now a run stopped before its first checkpoint
    assert ablate._set_aside(tmp_path / "best")[0].startswith("best had stopped before its first checkpoint")
    (aside,) = tmp_path.glob("best.before-*")
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "spec.flow", "spec.json"]


def test_commands_to_paste_are_shell_quoted(tmp_path):
    """A run folder with a space (or a quote) in its name is one word of the command a message names."""
    import shlex

    from flowspec.train import ablate
    from flowspec.train.trainer import resume_command

    run_dir = tmp_path / "my run's"
    words = ["flowspec", "train", "--resume", str(run_dir), "--max-steps", "3000"]
    assert shlex.split(resume_command(run_dir, 3000)) == words
    assert shlex.split(ablate.resume_command(run_dir)) == ["flowspec", "ablate", "--resume", str(run_dir)]
    run_dir.mkdir()
    (run_dir / LAST).write_bytes(b"")
    with pytest.raises(UserError, match="already holds a run") as refused:
        rundir.previous_checkpoint(run_dir, tiny_spec(), resume=False)
    assert shlex.split(str(refused.value).split("`")[1]) == words[:4]


def test_window_means_skip_the_skipped_steps():
    window = Window(CPU)
    assert window.read()[:2] == (None, None) and math.isnan(window.read()[2])
    for bpd, norm, ok in ((3.0, 1.0, True), (math.nan, math.inf, False), (5.0, 3.0, True)):
        window.add(torch.tensor(bpd), torch.tensor(norm), torch.tensor(ok), images=10)
    assert window.read() == (4.0, 2.0, 5.0) and window.images == 30 and window.img_s() > 0
    assert window.first[0] == 30 and window.total_images == 0  # the first read with steps: warm-up
    window.add(torch.tensor(math.inf), torch.tensor(1.0), torch.tensor(False), images=10)
    assert window.read()[2] == 5.0  # the latest good step
    window.reset()
    assert window.read()[:2] == (None, None) and window.images == 0 and window.total_images == 10
    window.add(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(True), images=10)
    window.restart_clock()  # what came before is not timed
    window.read()
    assert window.images == 0 and window.total_images == 10
    window.add(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(True), images=10)
    window.pause()  # counted up to here; nothing after it until the clock restarts
    assert window.images == 10 and window.total_images == 20
    window.read()
    assert window.images == 10 and window.total_images == 20


def test_record_appends_and_plots(tmp_path):
    record(tmp_path, {"step": 1, "train_bpd": 3.0, "test_bpd": 3.5}, "tiny")
    record(tmp_path, {"step": 2, "train_bpd": 2.0, "test_bpd": 2.5}, "tiny")
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2] and (tmp_path / "curves.png").is_file()
    assert len((tmp_path / METRICS).read_text().splitlines()) == 2


def test_a_row_cut_short_at_the_end_is_left_out_and_any_other_bad_line_named(tmp_path):
    path = tmp_path / METRICS
    path.write_bytes(b'{"step": 1, "train_bpd": 3.0}\n{"step": 2, "train_bpd": 2.5}\n{"step": 3, "tr')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]  # a process killed while writing row 3
    for bad in (b'{"step": 3, "tr', b"\xff\xfe", b'{"mine": 1}', b"[1, 2]"):
        path.write_bytes(b'{"step": 1}\n' + bad + b'\n{"step": 2}\n')
        with pytest.raises(UserError, match=f"{METRICS}:2 is not a row of flowspec metrics"):
            read_metrics(tmp_path)


def test_a_row_whose_numbers_are_not_numbers_is_named(tmp_path):
    """Valid JSON of the wrong type (a string where a number goes, a bool step) would fail in the curves."""
    path = tmp_path / METRICS
    for bad in (b'{"step": 2, "train_bpd": "2.8"}', b'{"step": true}', b'{"step": 2, "lr": [1]}'):
        path.write_bytes(b'{"step": 1, "test_bpd": null, "lr": 1e-3, "skipped": 0}\n' + bad + b"\n")
        with pytest.raises(UserError, match=f"{METRICS}:2 is not a row of flowspec metrics"):
            read_metrics(tmp_path)


def test_evaluator_measures_draws_and_leaves_the_training_rng_alone(tmp_path):
    spec = tiny_spec()
    model = flowspec.build(spec)
    test = load_split(spec.data, "test").images[:40]
    model.initialize(test)
    evaluate = Evaluator(test, EvalSpec(batch=16, samples=4), CPU, Dist(), tmp_path, spec.data.levels, seed=0)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = evaluate(model, step=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert 0.5 < first.test_bpd < 10 and first.inversion_error < 1e-3
    assert sorted(first.grids) == [0.8, 1.0] and all(p.is_file() for p in first.grids.values())
    assert first.grids[1.0].name == "step0000007_t1.0.png"
    assert evaluate(model, step=8).test_bpd == first.test_bpd  # seeded: the same noise every time


def test_restored_rng_states_are_the_captured_ones_after_a_checkpoint_round_trip():
    """Every global generator (torch's, numpy's, Python's, their cached Gaussians included) is set back to
    what `capture` took, through a weights-only `torch.load` as at a resume."""
    import io
    import random

    import numpy as np

    from flowspec.train.rng import capture, restore

    random.gauss(0, 1), np.random.standard_normal()  # each now holds a second Gaussian for its next draw
    before = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    buffer = io.BytesIO()
    torch.save(capture(CPU), buffer)
    random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal(), torch.rand(3)
    restore(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), CPU)
    assert torch.equal(torch.get_rng_state(), before[0])
    numpy = np.random.get_state()
    assert numpy[0] == before[1][0] and np.array_equal(numpy[1], before[1][1]) and numpy[2:] == before[1][2:]
    assert random.getstate() == before[2]


def test_save_run_writes_last_and_best_but_never_a_non_finite_model(tmp_path, capsys):
    model = torch.nn.Linear(2, 2)
    payload = {"step": 3, "model": model.state_dict(), **spec_record(tiny_spec())}
    assert save_run(tmp_path, payload, False, model) and (tmp_path / LAST).is_file()
    assert not (tmp_path / BEST).exists()
    assert save_run(tmp_path, payload, True, model) and (tmp_path / BEST).is_file()
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    (tmp_path / LAST).unlink()
    assert not save_run(tmp_path, {**payload, "model": model.state_dict()}, True, model)
    assert not (tmp_path / LAST).exists() and "non-finite weights at step 3" in capsys.readouterr().out


def test_one_process_agrees_with_itself():
    assert agree_to_stop(Dist(), CPU, None, False) == (None, False)
    assert agree_to_stop(Dist(), CPU, "SIGTERM", True) == ("SIGTERM", True)


def test_updater_steps_counts_and_skips_non_finite_steps():
    updater, x = tiny_updater(tiny_spec(ema=0.5))
    bpd, norm, ok = updater(x)
    assert bool(ok) and math.isfinite(float(bpd)) and float(norm) > 0 and updater.step == 1
    before = {k: v.clone() for k, v in updater.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in updater.ema.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in updater.optimizer.state.values()]
    with torch.no_grad():
        next(updater.model.parameters()).grad = None
    bad = x.clone()
    updater.model.dequantizer.forward = lambda v: (v.float() * math.nan, torch.zeros(len(v)))
    bpd, norm, ok = updater(bad)
    assert not bool(ok) and (updater.step, updater.skipped, updater.bad_in_row) == (2, 1, 1)
    after = updater.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing applied
    assert all(
        torch.equal(ema_before[k], v) for k, v in updater.ema.state_dict().items() if k != "n_averaged"
    )
    assert all(
        torch.equal(m, s["exp_avg"]) for m, s in zip(moments, updater.optimizer.state.values(), strict=True)
    )
    del updater.model.dequantizer.forward
    assert bool(updater(x)[2]) and (updater.skipped, updater.bad_in_row) == (1, 0)
    state = updater.state_dict()
    assert (state["step"], state["skipped"]) == (3, 1) and set(state) >= {
        "model",
        "ema",
        "optimizer",
        "scheduler",
    }


def test_the_ema_step_is_the_averaged_models_without_its_per_step_copies_of_the_count(monkeypatch):
    """`AveragedModel.update_parameters` copies its count from the CPU to the device for each group of
    tensors, and on a GPU each copy waits for the step to finish: the steps update the average directly."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    updater, x = tiny_updater(tiny_spec(ema=0.75))
    reference = AveragedModel(updater.model, multi_avg_fn=get_ema_multi_avg_fn(0.75), use_buffers=True)
    reference.update_parameters(updater.model)
    monkeypatch.setattr(updater.ema, "update_parameters", None)  # not called by a step
    for _ in range(2):
        updater(x)
        reference.update_parameters(updater.model)
    assert int(updater.ema.n_averaged) == int(reference.n_averaged) == 3
    ours, theirs = updater.ema.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-7)


def test_the_updater_gives_adam_tf1s_eps_at_each_step():
    updater, x = tiny_updater(tiny_spec(tf_eps=True))
    for step in (1, 2):
        updater(x)
        assert updater.optimizer.param_groups[0]["eps"] == pytest.approx(1e-8 / math.sqrt(1 - 0.999**step))


def test_accumulated_micro_batches_give_the_whole_batch_gradient():
    spec = tiny_spec(batch=16, warmup=0)
    torch.manual_seed(0)
    base = flowspec.build(spec).double()
    x = load_split(spec.data, "train").images[:16]
    base.initialize(x)
    results = []
    for accumulate in (1, 4):
        model = copy.deepcopy(base)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # no randomness: the micro-batches see what the whole batch sees
        model.dequantizer.forward = lambda v: (v.double() + 0.5, torch.zeros(len(v), dtype=torch.float64))
        train = spec.train.model_copy(update={"accumulate": accumulate})
        updater = Updater(model, train, None, Dist(), CPU)
        bpd, norm, ok = updater(x)
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((bpd, norm, grads, [p.detach().clone() for p in model.parameters()]))
    (bpd, norm, grads, weights), (bpd4, norm4, grads4, weights4) = results
    torch.testing.assert_close(bpd4, bpd, rtol=1e-12, atol=0)
    torch.testing.assert_close(norm4, norm, rtol=1e-12, atol=0)
    for a, b in zip(grads + weights, grads4 + weights4, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-14)
    assert not all(torch.equal(a, b) for a, b in zip(weights, base.parameters(), strict=False))  # it stepped


def test_accumulate_must_divide_the_batch(tmp_path):
    with pytest.raises(ValueError, match=r"batch \(16\) must be divisible by accumulate \(3\)"):
        tiny_spec(batch=16, accumulate=3)


def test_a_run_that_fails_before_it_starts_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tiny_spec().model_copy(update={"data": tiny_spec().data.model_copy(update={"dataset": "npz"})})
    with pytest.raises(UserError, match="names no folder"):
        Trainer(bad, RunOptions(device="cpu", quiet=True))  # the default folder, runs/tiny-<time>
    assert list((tmp_path / "runs").iterdir()) == []
    kept = tmp_path / "mine"
    kept.mkdir()
    with pytest.raises(UserError, match="names no folder"):
        Trainer(bad, RunOptions(out=kept, device="cpu", quiet=True))
    assert kept.is_dir()  # a folder that was there before stays
    with pytest.raises(UserError, match="names no folder"):  # and so do the folders above a new one
        Trainer(bad, RunOptions(out=kept / "a" / "b" / "c", device="cpu", quiet=True))
    assert list(kept.iterdir()) == []
    (kept / "a").mkdir()
    (kept / "a" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="names no folder"):
        Trainer(bad, RunOptions(out=Path("mine/a/b/c"), device="cpu", quiet=True))  # relative too
    assert [p.name for p in kept.rglob("*")] == ["a", "notes.txt"]


def test_a_lock_whose_file_was_removed_is_taken_on_the_new_file(tmp_path):
    """A failed run removes its empty folder while it holds the lock; a run waiting on that folder then
    locks the new lock file, so that a third cannot lock the same folder beside it."""
    from flowspec.train.lock import RunLock

    first = RunLock(tmp_path / "run")
    rundir.remove_if_empty(tmp_path / "run")
    assert not (tmp_path / "run").exists()
    second = RunLock(tmp_path / "run")
    first.release()
    with pytest.raises(UserError, match="is in use by pid"):
        RunLock(tmp_path / "run")
    second.release()


def test_the_run_header_says_whether_the_training_set_is_held_in_memory_or_streamed(tmp_path):
    import numpy as np

    from flowspec.spec import DataSpec

    images = tmp_path / "x.npy"
    np.save(images, np.random.default_rng(0).integers(0, 17, (120, 8, 8), dtype=np.uint8))
    spec = tiny_spec(
        data=DataSpec(dataset="npy", path=str(images), shape=(1, 8, 8), levels=17, test_split=20)
    )
    for memory, said in ((None, "held in memory"), (0, "streamed from its file")):
        trainer = Trainer(spec, RunOptions(out=tmp_path / f"run{memory}", device="cpu", data_memory=memory))
        try:
            assert f"(100 train / 20 test images, {said})" in trainer._banner()
        finally:
            trainer.close()
