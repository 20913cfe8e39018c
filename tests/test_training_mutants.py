"""Behaviours of the training core that a mutation audit found no test held: each test here fails on a
small change of flowspec/train (a schedule's offset, a setting the optimizer or a checkpoint drops, a
step of the loop left out) that every other test passed. Tiny models, one thread."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from train_helpers import tiny_spec, tiny_updater

from flowspec.model import FlowModel
from flowspec.spec import TrainSpec
from flowspec.train.schedule import adam_eps, build_optimizer, build_scheduler
from flowspec.train.trainer import RunOptions, Trainer
from flowspec.train.update import Updater

#: a small evaluation: 32 test images, no sample grids, no inversion check
QUICK_EVAL = {"images": 32, "samples": 0, "inversion": False}


def options(out, **kw) -> RunOptions:
    return RunOptions(out=out, device="cpu", **{"quiet": True, "eval": QUICK_EVAL, **kw})


def _learning_rates(train: TrainSpec, steps: int) -> list[float]:
    """The learning rate of each of the first `steps` steps under `train`'s schedule."""
    weights = torch.zeros(2, requires_grad=True)
    optimizer = build_optimizer([weights], train)
    scheduler = build_scheduler(optimizer, train, None)  # no length: none of these needs one
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradient: nothing moves
        scheduler.step()
    return rates


def test_a_step_schedule_counts_its_intervals_from_the_end_of_the_warmup():
    train = TrainSpec(lr=1e-2, warmup=3, schedule="step", step_every=5, step_gamma=0.5)
    rates = _learning_rates(train, 14)
    assert rates[3:] == pytest.approx([1e-2] * 5 + [5e-3] * 5 + [2.5e-3])  # halved at steps 8 and 13


def test_the_spec_s_seed_draws_the_initial_weights_and_the_init_batch(tmp_path, monkeypatch):
    """The same seed starts from the same weights on the same `init_batch` images; another seed from other
    weights (torch's global stream) and other images (the init batch's own generator)."""
    seen = []  # (weights before the data-dependent init, its images) of each Trainer
    initialize = FlowModel.initialize

    def recording(self, x):
        seen.append(({k: v.clone() for k, v in self.state_dict().items()}, x.clone()))
        return initialize(self, x)

    monkeypatch.setattr(FlowModel, "initialize", recording)
    for i, seed in enumerate((1, 1, 2)):
        Trainer(tiny_spec(steps=1, seed=seed, init_batch=16), options(tmp_path / f"run{i}")).close()
    (weights, images), (same_weights, same_images), (other_weights, other_images) = seen
    assert torch.equal(images, same_images) and all(torch.equal(weights[k], same_weights[k]) for k in weights)
    assert not torch.equal(images, other_images)
    assert not all(torch.equal(weights[k], other_weights[k]) for k in weights)


def test_the_evaluation_at_the_spec_s_length_is_scheduled_off_the_interval(tmp_path):
    """A length that is no multiple of `eval every` ends with a scheduled evaluation: a candidate for best
    (in best.pt and last.pt), not a stop's."""
    from flowspec.train.checkpoint import BEST, load_checkpoint
    from flowspec.train.trainer import train

    result = train(tiny_spec(steps=2, eval_every=1000), options(tmp_path / "run"))
    assert result.stopped == "finished" and result.best_scheduled and result.best_bpd == result.test_bpd
    assert load_checkpoint(tmp_path / "run" / BEST)["best_bpd"] == result.test_bpd
    assert load_checkpoint(tmp_path / "run")["best_bpd"] == result.test_bpd


def _break(updater: Updater) -> None:
    """Make the updater's next steps non-finite (until `del updater.model.dequantizer.forward`)."""
    updater.model.dequantizer.forward = lambda v: (v.float() * math.nan, torch.zeros(len(v)))


def test_a_resumed_updater_goes_on_counting_the_bad_steps_in_a_row():
    """A run resumed after a non-finite step stops after as many more in a row as the uninterrupted run."""
    updater, x = tiny_updater(tiny_spec())
    updater(x)
    _break(updater)
    updater(x)
    updater(x)
    state = copy.deepcopy(updater.state_dict())
    resumed, _ = tiny_updater(tiny_spec())
    resumed.load_state_dict(state)
    assert (resumed.step, resumed.skipped, resumed.bad_in_row) == (3, 2, 2)
    _break(resumed)
    resumed(x)
    assert (resumed.skipped, resumed.bad_in_row) == (3, 3)


def test_tf_eps_of_a_run_of_the_bits_per_dim_loss_is_in_that_loss_s_units():
    """Adam's eps (tf_eps: a new one at each step) applies to the bits/dim gradient of a run that loss
    began: D ln 2 times the spec's, as `clip_grad_norm` and the weight decay."""
    spec = tiny_spec(tf_eps=True)
    updater, x = tiny_updater(spec)
    updater(x)
    state = copy.deepcopy(updater.state_dict())
    del state["loss"]  # as flowspec wrote it when the loss was bits/dim
    resumed, _ = tiny_updater(spec)
    resumed.load_state_dict(state)
    for step in (1, 2):
        resumed(x)
        eps = resumed.optimizer.param_groups[0]["eps"]
        assert eps == pytest.approx(adam_eps(spec.train, step) * 64 * math.log(2), rel=1e-12)


def _draws() -> tuple[float, float, float]:
    """One number from each global generator: Python's, numpy's and torch's."""
    import random

    import numpy as np

    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_seed_all_seeds_python_s_numpy_s_and_torch_s_generators():
    from flowspec.train.rng import seed_all

    seed_all(5)
    first = _draws()
    seed_all(6)
    other = _draws()
    seed_all(5)
    again = _draws()
    assert again == first and all(a != b for a, b in zip(first, other, strict=True))


def test_a_second_random_stream_goes_on_where_it_stopped_and_leaves_the_first_as_it_was():
    from flowspec.train.rng import Stream

    cpu = torch.device("cpu")
    torch.manual_seed(9)
    outside = torch.rand(6)
    torch.manual_seed(7)
    inside = torch.rand(4)

    torch.manual_seed(9)
    stream = Stream(7, cpu)
    drawn = []
    for _ in range(2):
        drawn.append(torch.rand(3))  # the first stream, between the second's draws
        with stream:
            drawn.append(torch.rand(2))
    assert torch.equal(torch.cat(drawn[0::2]), outside) and torch.equal(torch.cat(drawn[1::2]), inside)


def test_a_step_whose_gradient_is_not_finite_is_skipped_though_its_loss_is():
    """An overflowing gradient (a finite loss) is a bad step too: nothing applied, counted as skipped."""
    updater, x = tiny_updater(tiny_spec())
    before = {k: v.clone() for k, v in updater.model.state_dict().items()}
    parameter = next(p for p in updater.model.parameters() if p.requires_grad)
    hook = parameter.register_hook(lambda grad: grad * math.inf)
    bpd, norm, applied = updater(x)
    hook.remove()
    assert math.isfinite(float(bpd)) and not math.isfinite(float(norm))
    assert not bool(applied) and (updater.skipped, updater.bad_in_row) == (1, 1)
    assert all(torch.equal(before[k], v) for k, v in updater.model.state_dict().items())


def test_an_evaluation_row_s_train_bits_per_dim_is_the_mean_since_the_previous_evaluation(tmp_path):
    from flowspec.train.metrics import is_eval
    from flowspec.train.trainer import train

    result = train(tiny_spec(steps=4, eval_every=2), options(tmp_path / "run", log_every=1))
    logged = {r["step"]: r["train_bpd"] for r in result.history if not is_eval(r)}  # one step each
    evaluated = {r["step"]: r["train_bpd"] for r in result.history if is_eval(r)}
    assert sorted(logged) == [1, 2, 3, 4] and sorted(evaluated) == [2, 4]
    assert evaluated[2] == pytest.approx((logged[1] + logged[2]) / 2, rel=1e-12)
    assert evaluated[4] == pytest.approx((logged[3] + logged[4]) / 2, rel=1e-12)


def test_a_non_finite_test_bits_per_dim_is_never_the_best(tmp_path, monkeypatch):
    """An evaluation whose bits/dim is nan (a diverging model, say) is no candidate: the next finite one is
    the best, in the result and best.pt."""
    import dataclasses

    from flowspec.train.checkpoint import BEST, load_checkpoint
    from flowspec.train.evaluation import Evaluator
    from flowspec.train.trainer import train

    evaluate = Evaluator.__call__

    def nan_at_step_2(self, model, step, *args, **kwargs):
        done = evaluate(self, model, step, *args, **kwargs)
        return dataclasses.replace(done, test_bpd=math.nan) if step == 2 else done

    monkeypatch.setattr(Evaluator, "__call__", nan_at_step_2)
    result = train(tiny_spec(steps=4, eval_every=2), options(tmp_path / "run"))
    assert math.isfinite(result.test_bpd) and result.best_bpd == result.test_bpd
    best = load_checkpoint(tmp_path / "run" / BEST)
    assert best["step"] == 4 and best["best_bpd"] == result.test_bpd


def test_a_checksum_tells_tensors_of_the_same_bytes_apart_by_shape_and_dtype():
    """A tensor stored with another shape or dtype but the same bytes is another checkpoint."""
    from flowspec.train.checkpoint import checksum

    weights = torch.arange(6, dtype=torch.float32)
    reference = checksum({"model": {"w": weights}})
    assert checksum({"model": {"w": weights.clone()}}) == reference
    assert checksum({"model": {"w": weights.reshape(2, 3)}}) != reference
    assert checksum({"model": {"w": weights.view(torch.int32)}}) != reference


def test_best_pt_is_written_before_last_pt(tmp_path, monkeypatch):
    """A crash between the two writes must not leave a last.pt that says it is the best beside an older
    best.pt: best.pt goes first."""
    from flowspec.train import checkpoint

    written = []
    monkeypatch.setattr(checkpoint, "save_atomic", lambda payload, path: written.append(path.name))
    model = torch.nn.Linear(2, 2)
    assert checkpoint.save_run(tmp_path, {"step": 1}, True, model)
    assert written == [checkpoint.BEST, checkpoint.LAST]


def test_a_model_whose_buffer_is_not_finite_is_not_checkpointed(tmp_path, capsys):
    from flowspec.train.checkpoint import LAST, save_run

    model = torch.nn.BatchNorm1d(2)
    model.running_mean[0] = math.nan
    assert not save_run(tmp_path, {"step": 5, "model": model.state_dict()}, False, model)
    assert not (tmp_path / LAST).exists() and "non-finite weights at step 5" in capsys.readouterr().out


def test_a_checkpoint_s_training_seconds_leave_out_evaluations_and_saves(tmp_path, monkeypatch):
    """`train_seconds` (what --budget and `max_run_time` count over a run's processes) is training time:
    evaluations and the checkpoints of `save every`, each an hour long on a (fake) clock, add nothing."""
    import time

    from flowspec.spec import Interval
    from flowspec.train import trainer
    from flowspec.train.checkpoint import load_checkpoint
    from flowspec.train.evaluation import Evaluator

    now = [0.0]

    def clock() -> float:
        now[0] += 1e-3
        return now[0]

    def an_hour_long(work):
        def slow(*args, **kwargs):
            now[0] += 3600.0
            return work(*args, **kwargs)

        return slow

    monkeypatch.setattr(time, "monotonic", clock)
    monkeypatch.setattr(Evaluator, "__call__", an_hour_long(Evaluator.__call__))
    monkeypatch.setattr(trainer, "save_run", an_hour_long(trainer.save_run))
    spec = tiny_spec(steps=4, eval_every=2, save_every=Interval(count=1, unit="steps"))
    trainer.train(spec, options(tmp_path / "run"))  # saved at steps 1 and 3, evaluated at 2 and 4
    assert 0 < load_checkpoint(tmp_path / "run")["train_seconds"] < 3600


def test_a_run_resumed_at_an_evaluation_logs_the_uninterrupted_run_s_rows(tmp_path):
    """The checkpoint of an evaluation step holds the loss sums from before it: a resumed run starts them
    again, so that its next evaluation row has the uninterrupted run's train bits/dim."""
    from flowspec.train.metrics import read_metrics
    from flowspec.train.trainer import train

    spec = tiny_spec(steps=4, eval_every=2)
    train(spec, options(tmp_path / "straight"))
    train(spec, options(tmp_path / "split", max_steps=2))  # stopped at the evaluation of step 2
    train(spec, options(tmp_path / "split", resume=True))
    timing = ("img_s", "eval_seconds")
    rows = [
        [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(tmp_path / run)]
        for run in ("straight", "split")
    ]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0] if r.get("test_bpd") is not None] == [2, 4]


def test_a_run_stopped_by_sigterm_was_stopped_by_a_signal_as_by_sigint():
    """What an ablation leaves out of its comparison and the API reports as interrupted: both signals."""
    from flowspec.train.signals import is_signal

    assert is_signal("SIGINT") and is_signal("SIGTERM")
    assert not any(is_signal(stop) for stop in ("finished", "max-steps", "max-time", None))


def test_a_refused_lock_removes_only_a_lock_file_it_made(tmp_path):
    """A run refused in a folder whose lock file an earlier run left keeps that file (its holder line is
    what another waiting process reads); one it made itself is removed."""
    from flowspec.train.lock import LOCK, RunLock

    RunLock(tmp_path / "new").release(refused=True)
    assert not (tmp_path / "new" / LOCK).exists()
    RunLock(tmp_path / "old").release()
    RunLock(tmp_path / "old").release(refused=True)
    assert (tmp_path / "old" / LOCK).exists()


def test_the_process_holding_a_run_folder_may_read_it(tmp_path):
    """`check_free` passes the folders this process holds (a run reading its own checkpoint), though its
    flock would conflict with the holder's."""
    from flowspec.train.lock import RunLock, check_free

    with RunLock(tmp_path):
        check_free(tmp_path)  # no error


def test_a_lock_file_removed_between_its_opening_and_its_locking_is_locked_anew(tmp_path, monkeypatch):
    """A failed run removes its folder's lock file while another process has it open, not yet locked: that
    process locks the new file, not the removed one (which would lock nothing anyone else opens)."""
    import fcntl
    import os

    from flowspec.train.lock import LOCK, RunLock

    flock, removed = fcntl.flock, []

    def removed_first(fd: int, operation: int) -> None:
        if not removed:
            (tmp_path / LOCK).unlink()
            removed.append(fd)
        flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", removed_first)
    with RunLock(tmp_path) as held:
        assert os.path.samestat(os.fstat(held.fd), os.stat(tmp_path / LOCK))


def test_a_step_trains_with_dropout_on_after_an_evaluation_of_the_model_itself():
    """Without an EMA, evaluations put the trained model itself into eval mode: the next step turns
    training mode (dropout) back on."""
    updater, x = tiny_updater(tiny_spec(ema=None))
    assert updater.eval_model is updater.model
    updater.model.eval()  # as an evaluation leaves it
    updater(x)
    assert updater.model.training


def test_rewriting_the_metrics_leaves_no_temporary_file(tmp_path):
    from flowspec.train.metrics import METRICS, append_metrics, read_metrics, truncate_metrics

    for step in (1, 2, 3):
        append_metrics(tmp_path, {"step": step, "train_bpd": 3.0})
    truncate_metrics(tmp_path, 2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == [METRICS]
