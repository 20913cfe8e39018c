"""The training loop: learning on synthetic and real data, exact resume, the recipe, non-finite steps."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys

import pytest
import torch
from train_helpers import tiny_spec, write_shards

import flowspec
from flowspec.errors import UserError
from flowspec.spec import DataSpec, Interval, TrainSpec
from flowspec.train.checkpoint import LAST, load_checkpoint, save_atomic
from flowspec.train.data import ImageSet, load_split
from flowspec.train.metrics import Window, is_eval, read_metrics, record
from flowspec.train.schedule import LrFactor, adam_eps, build_optimizer
from flowspec.train.trainer import RunOptions, Trainer, train
from flowspec.train.update import Objective, Updater


def options(out, **kw) -> RunOptions:
    return RunOptions(out=out, device="cpu", **{"quiet": True, **kw})


def test_synthetic_data_loss_goes_down_and_run_folder_is_complete(tmp_path):
    shards = write_shards(tmp_path / "shards")
    spec = tiny_spec(DataSpec(dataset="npz", shape=(1, 8, 8), levels=17), steps=30, eval_every=10)
    result = train(spec, options(tmp_path / "run", data_dir=shards))
    logged = read_metrics(tmp_path / "run")
    rows = [r for r in logged if is_eval(r)]
    assert [r["step"] for r in rows] == [10, 20, 30] and result.stopped == "finished"
    train_rows = [r for r in logged if not is_eval(r)]  # after the first step and every 10 (log_every)
    assert [r["step"] for r in train_rows] == [1, 10, 20, 30]
    assert train_rows[-1]["train_bpd"] < train_rows[0]["train_bpd"] and train_rows[-1]["lr"] > 0
    assert rows[-1]["test_bpd"] < rows[0]["test_bpd"] - 0.1
    assert rows[-1]["train_bpd"] < rows[0]["train_bpd"]
    assert all(r["inversion_error"] < 1e-3 and r["skipped"] == 0 for r in rows)
    assert set(rows[0]) >= {"epoch", "lr", "grad_norm", "img_s"}
    run = tmp_path / "run"
    for name in ("last.pt", "best.pt", "curves.png", "spec.json", "samples/step0000030_t0.8.png"):
        assert (run / name).is_file(), name
    assert json.loads((run / "spec.json").read_text())["name"] == "tiny"
    assert result.best_bpd == min(r["test_bpd"] for r in rows)
    # the data folder is remembered: resuming (to a later step) needs no --data
    assert load_checkpoint(run)["data_dir"] == str(shards.resolve())
    assert train(spec, options(run, resume=True)).stopped == "finished"


def test_real_cifar_subset_loss_goes_down(tmp_path, cifar10_dir):
    data = DataSpec(dataset="cifar10", shape=(3, 32, 32), levels=256)
    full_train, full_test = load_split(data, "train", cifar10_dir), load_split(data, "test", cifar10_dir)
    subset = {
        "train_set": ImageSet(full_train.images[:256], full_train.labels[:256], "cifar10[:256]"),
        "test_set": ImageSet(full_test.images[:32], full_test.labels[:32], "cifar10 test[:32]"),
    }
    spec = tiny_spec(data, steps=12, eval_every=6, attention=False, batch=32, lr=5e-3)
    result = train(spec, options(tmp_path / "run"), **subset)
    first, *_, last = [r for r in result.history if is_eval(r)]
    assert last["test_bpd"] < first["test_bpd"] and last["train_bpd"] < first["train_bpd"]
    assert 3.0 < last["test_bpd"] < 8.5


def _weights(run_dir):
    payload = load_checkpoint(run_dir)
    return payload["model"], payload["ema"], payload["optimizer"]["state"]


def test_resume_is_exact(tmp_path):
    spec = tiny_spec(steps=8, eval_every=3, hflip=True, accumulate=2)
    straight = train(spec, options(tmp_path / "straight"))
    train(spec, options(tmp_path / "split", max_steps=4))
    resumed = train(spec, options(tmp_path / "split", resume=True))
    assert straight.step == resumed.step == 8
    for a, b in zip(_weights(tmp_path / "straight"), _weights(tmp_path / "split"), strict=True):
        flat_a, flat_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
        assert len(flat_a) == len(flat_b) > 0
        assert all(torch.equal(x, y) for x, y in zip(flat_a, flat_b, strict=True))
    # best.pt and the metrics too: the --max-steps stop's evaluation at step 4 is left out on resuming
    best_a, best_b = (
        load_checkpoint(tmp_path / "straight" / "best.pt"),
        load_checkpoint(tmp_path / "split" / "best.pt"),
    )
    assert best_a["step"] == best_b["step"] and best_a["best_bpd"] == best_b["best_bpd"]
    assert all(torch.equal(best_a["model"][k], v) for k, v in best_b["model"].items())
    timing = ("img_s", "eval_seconds")
    rows = [
        [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(tmp_path / run)]
        for run in ("straight", "split")
    ]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0] if is_eval(r)] == [3, 6, 8]
    assert resumed.best_bpd == straight.best_bpd


def test_a_resumed_run_keeps_its_log_every_and_its_train_rows(tmp_path):
    """`--log-every 1` was not kept: `train --resume RUN` (what a stop's line says) logged every 10 steps,
    so the resumed run's metrics.jsonl lacked the uninterrupted run's train rows."""
    spec = tiny_spec(steps=7, eval_every=3)
    go = lambda out, **kw: flowspec.train(spec, out=out, device="cpu", quiet=True, **kw)  # noqa: E731
    go(tmp_path / "straight", log_every=1)
    go(tmp_path / "split", log_every=1, max_steps=4)
    assert load_checkpoint(tmp_path / "split")["log_every"] == 1
    flowspec.train(resume=tmp_path / "split", device="cpu", quiet=True)
    timing = ("img_s", "eval_seconds")
    rows = [
        [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(tmp_path / run)]
        for run in ("straight", "split")
    ]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0] if not is_eval(r)] == list(range(1, 8))
    # given again, it replaces the kept one; a checkpoint from before it was kept resumes with 10
    go(tmp_path / "again", log_every=1, max_steps=2)
    flowspec.train(resume=tmp_path / "again", device="cpu", quiet=True, log_every=3, max_steps=4)
    assert load_checkpoint(tmp_path / "again")["log_every"] == 3
    payload = load_checkpoint(tmp_path / "again")
    del payload["log_every"], payload["checksum"]
    save_atomic(payload, tmp_path / "again" / LAST)
    flowspec.train(resume=tmp_path / "again", device="cpu", quiet=True)
    assert load_checkpoint(tmp_path / "again")["log_every"] == 10
    logged = [r["step"] for r in read_metrics(tmp_path / "again") if not is_eval(r)]
    assert logged == [1, 2, 3]


def test_save_every_writes_checkpoints_between_evaluations_and_resumes_exactly(tmp_path, monkeypatch):
    spec = tiny_spec(steps=7, eval_every=1000, save_every=Interval(count=2, unit="steps"))
    saved = []  # (step, best) of every checkpoint written
    save = Trainer._save
    monkeypatch.setattr(
        Trainer,
        "_save",
        lambda self, best, last=True: (saved.append((self.step, best)), save(self, best, last))[1],
    )
    straight = train(spec, options(tmp_path / "straight"))
    assert [step for step, best in saved if not best] == [2, 4, 6, 7]  # the last before the final evaluation
    assert [r["step"] for r in straight.history if is_eval(r)] == [7]  # saving is not evaluating

    call = Updater.__call__

    def crash_at_step_6(self, x, flags=None):
        if self.step == 5:
            raise RuntimeError("the machine went down")
        return call(self, x, flags)

    monkeypatch.setattr(Updater, "__call__", crash_at_step_6)
    with pytest.raises(RuntimeError, match="went down"):
        train(spec, options(tmp_path / "crashed"))
    assert load_checkpoint(tmp_path / "crashed")["step"] == 4
    monkeypatch.setattr(Updater, "__call__", call)
    resumed = train(spec, options(tmp_path / "crashed", resume=True))
    assert resumed.step == 7
    for a, b in zip(_weights(tmp_path / "straight"), _weights(tmp_path / "crashed"), strict=True):
        assert all(
            torch.equal(x, y) for x, y in zip(*map(torch.utils._pytree.tree_leaves, (a, b)), strict=True)
        )


@pytest.mark.parametrize("row_written", [True, False])
def test_a_crash_around_an_evaluation_row_resumes_to_the_same_best_and_rows(
    tmp_path, monkeypatch, row_written
):
    """The row of an evaluation marks it done for a resumed run: best.pt is written before it, and a
    resumed run that evaluates again (no row) writes the row the uninterrupted run wrote."""
    from flowspec.train import trainer as trainer_module

    spec = tiny_spec(steps=6, eval_every=3)
    straight = train(spec, options(tmp_path / "straight"))
    assert load_checkpoint(tmp_path / "straight" / "best.pt")["step"] == 6  # the evaluation crashed around
    real = trainer_module.record

    def crash_around_the_row_of_step_6(run_dir, row, name):
        if row_written or row["step"] != 6:
            real(run_dir, row, name)
        if row["step"] == 6:
            raise RuntimeError("killed")

    monkeypatch.setattr(trainer_module, "record", crash_around_the_row_of_step_6)
    with pytest.raises(RuntimeError, match="killed"):
        train(spec, options(tmp_path / "crashed"))
    monkeypatch.undo()
    resumed = train(spec, options(tmp_path / "crashed", resume=True))
    assert resumed.best_bpd == straight.best_bpd
    best = [load_checkpoint(tmp_path / run / "best.pt") for run in ("straight", "crashed")]
    assert best[0]["step"] == best[1]["step"] and best[0]["best_bpd"] == best[1]["best_bpd"]
    timing = ("img_s", "eval_seconds")
    rows = [
        [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(tmp_path / run) if is_eval(r)]
        for run in ("straight", "crashed")
    ]
    assert rows[0] == rows[1]


def test_a_full_disk_at_best_pt_then_resumed_writes_best_pt(tmp_path, monkeypatch):
    """best.pt goes first: a last.pt that says a better evaluation was seen never stands beside an older
    best.pt (a resumed run would not find that evaluation better again)."""
    import errno

    from flowspec.train import checkpoint

    spec = tiny_spec(steps=6, eval_every=3)
    straight = train(spec, options(tmp_path / "straight"))
    real = checkpoint.save_atomic

    def full_at_the_second_best(payload, path):
        if path.name == "best.pt" and payload["step"] == 6:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(payload, path)

    monkeypatch.setattr(checkpoint, "save_atomic", full_at_the_second_best)
    with pytest.raises(UserError, match="no space left writing .*best.pt"):
        train(spec, options(tmp_path / "full"))
    monkeypatch.undo()
    train(spec, options(tmp_path / "full", resume=True))
    best = [load_checkpoint(tmp_path / run / "best.pt") for run in ("straight", "full")]
    assert best[0]["step"] == best[1]["step"] == 6 and best[1]["best_bpd"] == straight.best_bpd


def test_a_stop_evaluation_is_recorded_but_not_a_candidate_for_best(tmp_path):
    spec = tiny_spec(steps=8, eval_every=3)
    result = train(spec, options(tmp_path / "run", max_steps=4))
    evaluations = [r for r in read_metrics(tmp_path / "run") if is_eval(r)]
    assert [r["step"] for r in evaluations] == [3, 4]
    assert load_checkpoint(tmp_path / "run")["best_bpd"] == evaluations[0]["test_bpd"] == result.best_bpd
    assert load_checkpoint(tmp_path / "run" / "best.pt")["step"] == 3
    short = train(spec, options(tmp_path / "short", max_steps=2))  # no scheduled evaluation yet
    assert load_checkpoint(tmp_path / "short")["best_bpd"] is None and short.best_bpd == short.test_bpd
    assert load_checkpoint(tmp_path / "short" / "best.pt")["step"] == 2  # the only evaluated weights


def test_metrics_are_strict_json(tmp_path):
    """A value that is not finite (the inversion error of a short run, which skips the check) is null:
    `NaN` is not JSON, and strict readers refuse it."""

    def refuse(constant: str):
        raise ValueError(f"{constant} in metrics.jsonl")

    train(tiny_spec(steps=8, eval_every=4), options(tmp_path / "run", max_steps=2))
    rows = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert rows[-1]["inversion_error"] is None and rows[-1]["test_bpd"] > 0


def test_logged_learning_rate_is_the_one_each_step_used(tmp_path):
    spec = tiny_spec(steps=4, eval_every=2, lr=1e-2, warmup=4)
    result = train(spec, options(tmp_path / "run", log_every=1))
    rows = [r for r in result.history if not is_eval(r)]
    assert [r["lr"] for r in rows] == pytest.approx([1e-2 * k / 4 for k in (0, 1, 2, 3)])  # from 0


def test_adam_warmup_ema_and_clipping_follow_the_spec(tmp_path, monkeypatch):
    recipe = dict(
        lr=1e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=1e-5, warmup=4, ema=0.9, clip_grad_norm=1e-3
    )
    spec = tiny_spec(steps=1, **recipe)
    clipped = []  # (max_norm, the norm before clipping, the norm after)
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        norm = clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in parameters if p.grad is not None])
        )
        clipped.append((max_norm, norm.item(), after.item()))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    trainer = Trainer(spec, options(tmp_path / "run"))
    group = trainer.updater.optimizer.param_groups[0]
    assert isinstance(trainer.updater.optimizer, torch.optim.Adam)
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-6, 1e-5)
    assert group["lr"] == 0.0  # the first warmup step, as the official code's
    assert trainer.updater.model.initialized  # data-dependent init ran before the first step
    before = [p.detach().clone() for p in trainer.updater.ema.module.parameters()]
    trainer.run()
    model = list(trainer.updater.model.parameters())
    for old, ema, new in zip(before, trainer.updater.ema.module.parameters(), model, strict=True):
        torch.testing.assert_close(ema, 0.9 * old + 0.1 * new)  # not 0.1 old + 0.9 new
    [(max_norm, norm, after)] = clipped
    assert max_norm == 1e-3 and norm > 1e-2 and after == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("shrinking", [False, True], ids=["growing gradients", "shrinking gradients"])
@pytest.mark.parametrize("tf_eps", [True, False])
def test_tf_eps_makes_torchs_adam_take_tf1_adams_steps(tf_eps, shrinking):
    """TF1's AdamOptimizer (the official code's) adds eps to sqrt(v) before the bias correction, torch's
    after it: with tf_eps, torch's fused Adam given `adam_eps` at each step takes TF1's steps, also where
    the gradients are near eps (without it, 3.8x larger ones at 1e-7). Shrinking gradients tell AMSGrad
    (the largest v so far) from Adam, which growing ones cannot."""
    import numpy as np

    train = TrainSpec(lr=1e-3, eps=1e-8, tf_eps=tf_eps)
    weights = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    optimizer = build_optimizer([weights], train)
    ours, m, v = [], np.zeros(4), np.zeros(4)
    theirs, b1, b2 = np.zeros(4), *train.betas
    for step in range(5):
        grad = np.array([1e-7, -3e-6, 2e-5, 1e-3]) * (0.01**step if shrinking else 1 + step)
        weights.grad = torch.from_numpy(grad.copy())
        for group in optimizer.param_groups:
            group["eps"] = adam_eps(train, step)
        optimizer.step()
        m, v, t = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad**2, step + 1
        theirs = theirs - 1e-3 * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + 1e-8)
        ours = weights.detach().numpy()
    assert np.allclose(ours, theirs, rtol=1e-9, atol=0) == tf_eps, (ours, theirs)


def test_the_loss_is_nats_per_image_so_clipping_has_the_official_threshold(tmp_path):
    """The official loss is the mean negative log-likelihood in nats per image: the gradient norm that
    `clip_grad_norm` bounds is D ln 2 times the bits/dim gradient's (64 ln 2 here, 2,129 on CIFAR-10)."""
    trainer = Trainer(tiny_spec(steps=1, clip_grad_norm=5.0), options(tmp_path / "run"))
    updater, x = trainer.updater, next(trainer.batches)
    parameters = [p for p in updater.model.parameters() if p.requires_grad]
    updater.model.train()
    torch.manual_seed(3)  # the same dropout masks and dequantization noise in both calls
    bpd = updater.model.bpd(x).mean()
    grads = torch.autograd.grad(bpd, parameters, allow_unused=True)
    bpd_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads if g is not None]))
    torch.manual_seed(3)
    reported_bpd, norm, applied = updater(x)
    assert applied and reported_bpd == pytest.approx(bpd.item(), rel=1e-5)
    assert norm.item() == pytest.approx(bpd_norm.item() * 64 * math.log(2), rel=1e-4)
    assert norm > 5 > bpd_norm  # clipped, where a bits/dim loss would not have been
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
    assert after.item() == pytest.approx(5.0, rel=1e-4)


def test_a_checkpoint_from_the_bits_per_dim_loss_resumes_with_its_adam_averages_rescaled(tmp_path):
    """Checkpoints written when the loss was bits/dim hold Adam's averages of gradients D ln 2 times
    smaller: resumed as they are, the first steps would be several times too large."""
    trainer = Trainer(tiny_spec(steps=3), options(tmp_path / "run"))
    updater = trainer.updater
    updater(next(trainer.batches))
    state = copy.deepcopy(updater.state_dict())
    assert state["loss"] == "nats per image"
    k = 64 * math.log(2)
    old = copy.deepcopy(state)
    del old["loss"]
    for moments in old["optimizer"]["state"].values():
        moments["exp_avg"] /= k
        moments["exp_avg_sq"] /= k**2
    fresh = Trainer(tiny_spec(steps=3), options(tmp_path / "other")).updater
    fresh.load_state_dict(old)
    for i, moments in fresh.optimizer.state_dict()["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(moments[name], state["optimizer"]["state"][i][name])


def test_an_optimizer_state_from_before_fused_adam_resumes_and_trains(tmp_path):
    """Checkpoints written before Adam was fused say `fused: None` (and `foreach: None`) in their groups:
    loaded as they are, they made the Adam a plain one, whose step refuses the `found_inf` a step sets."""
    trainer = Trainer(tiny_spec(steps=3), options(tmp_path / "run"))
    updater = trainer.updater
    updater(next(trainer.batches))
    old = copy.deepcopy(updater.state_dict())
    for group in old["optimizer"]["param_groups"]:
        group.update(fused=None, foreach=None)
    fresh = Trainer(tiny_spec(steps=3), options(tmp_path / "other"))
    fresh.updater.load_state_dict(old)
    assert all(group["fused"] is True for group in fresh.updater.optimizer.param_groups)
    _, _, applied = fresh.updater(next(fresh.batches))
    assert applied and fresh.updater.step == 2
    assert fresh.updater.state_dict()["optimizer"]["param_groups"][0]["fused"] is True


class _BitsPerDim(torch.nn.Module):
    """The loss of flowspec before 8a4a1ba: the batch's mean bits/dim."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.bpd(x).mean()


def test_a_run_of_the_bits_per_dim_loss_goes_on_as_that_loss_trained_it_also_after_another_resume(tmp_path):
    """A checkpoint of the old loss (bits/dim, clipped at clip_grad_norm in bits/dim) goes on with exactly
    the steps the old flowspec made: its Adam averages rescaled, and the clip, eps and weight decay scaled by
    D ln 2 (the
    nats-per-image gradient clipped at 1.0 takes steps tens of times off). The checkpoint the resumed run
    writes says so, so that a second resume goes on alike, rescaling nothing twice."""
    from flowspec.train.update import CLIP_IN

    spec = tiny_spec(steps=20, clip_grad_norm=1.0, weight_decay=1e-2)
    reference = Trainer(spec, options(tmp_path / "old"))
    old = reference.updater
    old.objective = _BitsPerDim(old.model)
    batches = [next(reference.batches) for _ in range(6)]

    def steps(updater, first, last):
        for i in range(first, last):
            torch.manual_seed(i)  # the same dequantization noise and dropout in both runs
            norm = updater(batches[i])[1]
        return norm

    assert steps(old, 0, 2) > 1.0  # the bits/dim gradient is clipped too
    state = copy.deepcopy(old.state_dict())
    del state["loss"]  # as the old flowspec wrote it
    resumed = Trainer(spec, options(tmp_path / "new")).updater
    resumed.load_state_dict(state)
    assert "loss was bits/dim" in resumed.note and "clipped at 44.36" in resumed.note

    def weights(updater):
        return torch.cat([p.detach().flatten() for p in updater.model.parameters()])

    start = weights(old)
    for pair in ((0, 2, 4), (1, 4, 6)):
        steps(old, *pair[1:])
        steps(resumed, *pair[1:])
        # the same steps but for rounding (clipping the nats-per-image gradient at 1.0: some 50% off)
        moved = (weights(old) - start).norm()
        assert (weights(resumed) - weights(old)).norm() < 1e-3 * moved
        if pair[0] == 0:  # a second resume, from the checkpoint the resumed run writes
            state = copy.deepcopy(resumed.state_dict())
            assert state["loss"] == "nats per image" and state[CLIP_IN] == "bits/dim"
            resumed = Trainer(spec, options(tmp_path / f"again{pair[0]}")).updater
            resumed.load_state_dict(state)
            assert resumed.note is not None
    # a run of this loss records nothing of the kind
    assert CLIP_IN not in Trainer(spec, options(tmp_path / "today")).updater.state_dict()


def _resume_files(run):
    files = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "spec.json", "spec.flow", LAST)}
    return files | {str(p.relative_to(run)): p.read_bytes() for p in (run / "tensorboard").rglob("*")}


@pytest.mark.parametrize("where", ["first step", "optimizer state"])
def test_a_resume_that_fails_leaves_the_run_folder_as_it_was(tmp_path, monkeypatch, where):
    """A resume that fails while restoring the checkpoint, or at its first step (an old checkpoint whose
    optimizer state no longer works), changes nothing: the stop's evaluation row stays (it goes once
    training goes on, with the next row written), so do rows after the checkpoint (a crash before the
    next one), and spec.json and spec.flow are written again only
    then (here they differ from what this flowspec writes: as an older one's would); the TensorBoard log
    too, as metrics.jsonl (no new events file, the stop's evaluation kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def evaluated() -> list[int]:
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        return [e.step for e in events.Scalars("test/bpd")]

    run = tmp_path / "run"
    spec = tiny_spec(steps=8)
    train(spec, options(run, max_steps=3, tensorboard=True))
    recorded = json.loads((run / "spec.json").read_text())
    (run / "spec.json").write_text(json.dumps(recorded, indent=4) + "\n")
    (run / "spec.flow").write_text((run / "spec.flow").read_text() + "# a note\n")
    with (run / "metrics.jsonl").open("a") as rows:  # steps trained after the checkpoint, then a crash
        rows.writelines(json.dumps({"kind": "train", "step": s, "train_bpd": 9.0}) + "\n" for s in (4, 5))
    before = _resume_files(run)
    assert [r["step"] for r in read_metrics(run) if is_eval(r)] == [3] == evaluated()

    def fails(*args, **kwargs):
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:
        if where == "first step":
            patch.setattr(Updater, "__call__", fails)
        else:
            patch.setattr(torch.optim.Adam, "load_state_dict", fails)
        with pytest.raises(RuntimeError, match="boom"):
            train(spec, options(run, resume=True, max_steps=6, tensorboard=True))
    assert _resume_files(run) == before and evaluated() == [3]
    train(spec, options(run, resume=True, max_steps=6, tensorboard=True))  # once training goes on,
    assert [r["step"] for r in read_metrics(run) if is_eval(r)] == [6] == evaluated()  # the stop's row goes
    assert 9.0 not in [r["train_bpd"] for r in read_metrics(run)]  # and the rows after the checkpoint
    assert json.loads((run / "spec.json").read_text()) == recorded
    assert (run / "spec.json").read_bytes() != before["spec.json"]  # written again, by this flowspec


def test_schedule_factors():
    cosine = LrFactor(warmup=10, kind="cosine", total=110, every=1, gamma=1.0)
    assert cosine(0) == 0.0 and cosine(1) == pytest.approx(0.1) and cosine(10) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.5) and cosine(110) == pytest.approx(0.0)
    step = LrFactor(warmup=0, kind="step", total=None, every=5, gamma=0.5)
    assert [step(i) for i in (0, 4, 5, 10)] == [1.0, 1.0, 0.5, 0.25]
    assert LrFactor(warmup=0, kind="constant", total=None, every=1, gamma=1.0)(1000) == 1.0
    # both warmups start at lr 0, as the official launchers' `max_lr * step / warmup_steps` (that step
    # still moves Adam's averages and count)
    first = LrFactor(warmup=4, kind="constant", total=None, every=1, gamma=1.0)
    assert [first(i) for i in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    second = LrFactor(4, "constant", None, 1, 1.0, rewarm_at=10, rewarm_steps=4, rewarm=0.1)
    assert [second(i) for i in range(9, 16)] == pytest.approx([1.0, 0.0, 0.025, 0.05, 0.075, 0.1, 0.1])


def test_cosine_without_length_is_a_spec_error():
    text = "model m\nflow { squeeze }\ntrain {\n  warmup 10 steps, then cosine\n}\n"
    with pytest.raises(
        UserError, match=r"m.flow:4:3: a cosine schedule needs a training length: add `length"
    ):
        flowspec.parse_spec(text, source="m.flow")
    spec = flowspec.parse_spec(text.replace("cosine", "cosine  length 100 steps"), source="m.flow")
    assert spec.train.schedule == "cosine" and spec.train.length.count == 100


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    forward = Objective.forward
    calls = {"n": 0}

    def flaky(self, x):
        calls["n"] += 1
        loss = forward(self, x)
        return loss * math.nan if calls["n"] in (2, 4) else loss

    ema = []  # the EMA weights after each step
    step = Updater.__call__

    def keeping_the_ema(self, x, flags=None):
        result = step(self, x, flags)
        ema.append({k: v.clone() for k, v in self.ema.state_dict().items()})
        return result

    monkeypatch.setattr(Updater, "__call__", keeping_the_ema)
    monkeypatch.setattr(Objective, "forward", flaky)
    result = train(tiny_spec(steps=5), options(tmp_path / "ok", max_bad_steps=2, log_every=1))  # not in a row
    assert result.history[-1]["skipped"] == 2
    for skipped in (1, 3):  # steps 2 and 4 leave the EMA as it was
        assert all(torch.equal(ema[skipped][k], v) for k, v in ema[skipped - 1].items() if k != "n_averaged")
    assert all(
        torch.isfinite(v).all()
        for v in load_checkpoint(tmp_path / "ok")["model"].values()
        if v.is_floating_point()
    )

    monkeypatch.setattr(Objective, "forward", lambda self, x: forward(self, x) * math.inf)
    with pytest.raises(UserError, match=r"3 steps in a row had a non-finite loss or gradient") as error:
        train(tiny_spec(steps=50), options(tmp_path / "bad", max_bad_steps=3, log_every=1))
    saved = tmp_path / "bad" / "nonfinite_batch.pt"
    assert str(saved) in str(error.value) and torch.load(saved)["images"].shape == (16, 1, 8, 8)
    assert "no checkpoint was written before it" in str(error.value)  # none to promise
    assert not (tmp_path / "bad" / LAST).exists()


def test_the_loop_reads_the_device_only_when_it_logs_or_evaluates(tmp_path, monkeypatch):
    step, reads = [0], set()
    call, read, counts = Updater.__call__, Window.read, Updater.bad_in_row
    monkeypatch.setattr(
        Updater,
        "__call__",
        lambda self, x, flags=None: (step.__setitem__(0, self.step + 1), call(self, x, flags))[1],
    )
    monkeypatch.setattr(Window, "read", lambda self: reads.add(step[0]) or read(self))
    monkeypatch.setattr(Updater, "bad_in_row", property(lambda self: reads.add(step[0]) or counts.fget(self)))
    train(tiny_spec(steps=12, eval_every=6), options(tmp_path / "run", log_every=4))
    assert reads == {1, 4, 6, 8, 12}  # logging after the first step and every 4, evaluating every 6


def test_bf16_autocast_of_the_coupling_networks(tmp_path):
    trainer = Trainer(tiny_spec(steps=2), options(tmp_path / "run", precision="bf16"))
    assert {c.autocast_dtype for c in trainer.updater.model.couplings()} == {torch.bfloat16}
    result = trainer.run()
    assert result.step == 2 and result.test_bpd is not None and math.isfinite(result.test_bpd)


def test_resuming_a_stop_with_nothing_left_to_train_keeps_its_evaluation(tmp_path, capsys):
    spec = tiny_spec(steps=8, eval_every=3)
    first = train(spec, options(tmp_path / "run", max_steps=4))
    again = train(spec, options(tmp_path / "run", resume=True, max_steps=4))
    assert again.stopped == "max-steps" and again.test_bpd == first.test_bpd
    assert [r["step"] for r in again.history if is_eval(r)] == [3, 4]
    assert again.best_bpd == first.best_bpd  # the scheduled evaluation's, at step 3


def test_a_stop_whose_evaluation_was_cut_off_evaluates_when_resumed_with_nothing_to_train(
    tmp_path, monkeypatch
):
    from flowspec.train import trainer as trainer_module

    spec = tiny_spec(steps=8, eval_every=3)
    straight = train(spec, options(tmp_path / "straight", max_steps=4))
    real = trainer_module.record

    def cut_off_at_step_4(run_dir, row, name):
        if row["step"] == 4:
            raise RuntimeError("killed during the evaluation")
        real(run_dir, row, name)

    monkeypatch.setattr(trainer_module, "record", cut_off_at_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        train(spec, options(tmp_path / "cut", max_steps=4))
    monkeypatch.undo()
    again = train(spec, options(tmp_path / "cut", resume=True, max_steps=4))
    assert [r["step"] for r in again.history if is_eval(r)] == [3, 4]
    assert again.test_bpd == straight.test_bpd and again.stopped == "max-steps"


def test_a_checkpoint_whose_best_counted_a_stop_evaluation_is_corrected_on_resuming(tmp_path):
    """Checkpoints written before stops were left out of the best: the best is rebuilt from the
    scheduled evaluations, so it is the uninterrupted run's."""
    spec = tiny_spec(steps=8, eval_every=3)
    train(spec, options(tmp_path / "run", max_steps=4))
    payload = load_checkpoint(tmp_path / "run")
    payload["best_bpd"] = -1.0  # as if the stop's evaluation had won
    save_atomic({k: v for k, v in payload.items() if k != "checksum"}, tmp_path / "run" / "last.pt")
    resumed = train(spec, options(tmp_path / "run", resume=True))
    straight = train(spec, options(tmp_path / "straight"))
    assert resumed.best_bpd == straight.best_bpd > 0


def test_resuming_without_metrics_keeps_the_checkpoints_best(tmp_path):
    spec = tiny_spec(steps=8, eval_every=3)
    train(spec, options(tmp_path / "run", max_steps=4))
    kept = load_checkpoint(tmp_path / "run")["best_bpd"]
    (tmp_path / "run" / "metrics.jsonl").unlink()
    again = train(spec, options(tmp_path / "run", resume=True, max_steps=4))  # nothing left to train
    assert kept is not None and again.best_bpd == kept


def test_a_resumed_run_keeps_the_precision_it_trained_in(tmp_path):
    spec = tiny_spec(steps=4, eval_every=2)
    straight = train(spec, options(tmp_path / "straight", precision="bf16"))
    train(spec, options(tmp_path / "split", precision="bf16", max_steps=2))
    resumed = train(spec, options(tmp_path / "split", resume=True))  # no precision given: the run's
    assert straight.step == resumed.step == 4 and load_checkpoint(tmp_path / "split")["precision"] == "bf16"
    for a, b in zip(_weights(tmp_path / "straight"), _weights(tmp_path / "split"), strict=True):
        flat_a, flat_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
        assert all(torch.equal(x, y) for x, y in zip(flat_a, flat_b, strict=True))


def test_the_precision_of_a_resumed_run_is_said_and_may_be_changed(tmp_path):
    spec = tiny_spec(steps=4, eval_every=2)
    train(spec, options(tmp_path / "run", precision="bf16", max_steps=2))

    def chosen(**kw) -> tuple[str, str]:
        trainer = Trainer(spec, options(tmp_path / "run", resume=True, **kw))
        trainer.close()
        return trainer.precision, trainer.precision_reason

    assert chosen() == ("bf16", "the run's")
    assert chosen(precision="fp32") == ("fp32", "the run trained in bf16 until step 2")
    payload = load_checkpoint(tmp_path / "run")  # a checkpoint from before the precision was kept: fp32
    del payload["precision"], payload["precision_asked"], payload["checksum"]
    save_atomic(payload, tmp_path / "run" / LAST)
    assert chosen() == ("fp32", "")


def test_a_run_that_asked_for_auto_resolves_it_again_on_resuming(tmp_path, monkeypatch):
    """`auto` picked bf16 here; resumed where the hardware has no native bf16, it picks fp32 (and says the
    run trained in bf16 until then)."""
    from flowspec.train import precision

    spec = tiny_spec(steps=4, eval_every=2)
    monkeypatch.setattr(precision, "native_bf16", lambda device: "CPU AVX512 with avx512_bf16")
    train(spec, options(tmp_path / "run", precision="auto", max_steps=2))
    payload = load_checkpoint(tmp_path / "run")
    assert (payload["precision"], payload["precision_asked"]) == ("bf16", "auto")
    monkeypatch.setattr(precision, "native_bf16", lambda device: None)
    trainer = Trainer(spec, options(tmp_path / "run", resume=True))
    trainer.close()
    assert trainer.precision == "fp32"
    assert trainer.precision_reason == (
        "the run's, auto: no native bf16 on this cpu; the run trained in bf16 until step 2"
    )
    with pytest.raises(UserError, match="unknown precision 'fp16'"):
        Trainer(spec, options(tmp_path / "other", precision="fp16"))
    assert not (tmp_path / "other").exists()


def test_evaluations_count_neither_in_the_throughput_nor_in_max_time(tmp_path, monkeypatch):
    """On a clock where a step takes 1 s and an evaluation (with its checkpoints) 100 s: 16 img/s at
    batch 16, and --max-time 5 stops after 5 s of training, not at the first evaluation."""
    import types

    from flowspec.train import evaluation, metrics, trainer
    from flowspec.train import update as update_module

    clock = [0.0]
    fake_time = types.SimpleNamespace(monotonic=lambda: clock[0])
    monkeypatch.setattr(metrics, "time", fake_time)
    monkeypatch.setattr(trainer, "time", fake_time)

    def slow(method, seconds):
        def timed(*args, **kwargs):
            clock[0] += seconds
            return method(*args, **kwargs)

        return timed

    monkeypatch.setattr(update_module.Updater, "__call__", slow(update_module.Updater.__call__, 1.0))
    monkeypatch.setattr(evaluation.Evaluator, "__call__", slow(evaluation.Evaluator.__call__, 100.0))
    spec = tiny_spec(steps=8, eval_every=2, batch=16)
    result = train(spec, options(tmp_path / "all", log_every=1))
    rows = [r for r in result.history if is_eval(r)]
    assert result.img_s == 16.0 and [r["img_s"] for r in rows] == [16.0] * 4
    timed = train(spec, options(tmp_path / "timed", max_time=5.0))
    assert (timed.stopped, timed.step) == ("max-time", 5)


def test_a_run_resumed_on_other_images_says_so(tmp_path, capsys):
    """The count of images is checked (the data position needs it); their content is compared by a sample:
    a resume on other images of the same count goes on, but says which split changed."""
    import numpy as np

    shards = write_shards(tmp_path / "shards")
    spec = tiny_spec(steps=6, data=DataSpec(dataset="npz", path=str(shards), shape=(1, 8, 8), levels=17))
    train(spec, options(tmp_path / "run", max_steps=2, quiet=False))
    train(spec, options(tmp_path / "run", resume=True, max_steps=4, quiet=False))
    assert "not those this run was trained on" not in capsys.readouterr().out
    with np.load(shards / "test.npz") as test:
        np.savez(shards / "test.npz", x=16 - test["x"], y=test["y"])
    train(spec, options(tmp_path / "run", resume=True, quiet=False))
    said = capsys.readouterr().out
    assert "note: the test images are not those this run was trained on before" in said
    assert "best test bits/dim so far was measured on other test images" in said
    with np.load(shards / "train_1.npz") as part:
        np.savez(shards / "train_1.npz", x=16 - part["x"], y=part["y"])
    train(spec, options(tmp_path / "run", resume=True, max_steps=6))  # quiet: the note still shows
    said = capsys.readouterr().out
    assert "note: the train images are not those this run was trained on before" in said
    assert "training goes on with these" in said


def test_an_evaluation_resumed_with_nothing_left_to_train_has_the_run_s_throughput(tmp_path):
    """The images and seconds of the interval are in the checkpoint: the row of an evaluation that runs
    after a resume (here a --max-steps stop's, killed before its row) has the uninterrupted run's img/s."""
    spec, run_dir = tiny_spec(steps=8, eval_every=2), tmp_path / "run"
    train(spec, options(run_dir, max_steps=3))
    rows = read_metrics(run_dir)
    stop = rows[-1]
    assert stop["step"] == 3 and is_eval(stop) and stop["img_s"] > 0
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    resumed = train(spec, options(run_dir, resume=True, max_steps=3))
    again = read_metrics(run_dir)[-1]
    assert again["step"] == 3 and again["img_s"] == stop["img_s"] == resumed.img_s


def test_a_signal_while_an_evaluation_writes_its_results_stops_before_another_step(tmp_path, monkeypatch):
    from flowspec.train import trainer

    def record_then_signal(*args, **kwargs):
        record(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # after the evaluation's last check

    monkeypatch.setattr(trainer, "record", record_then_signal)
    result = train(tiny_spec(steps=8, eval_every=2), options(tmp_path / "run"))
    assert (result.stopped, result.step) == ("SIGINT", 2) and load_checkpoint(tmp_path / "run")["step"] == 2


def test_a_run_resumed_past_max_steps_says_so_even_when_quiet(tmp_path, capsys):
    """The note says why nothing happened: --quiet hides the progress, not that."""
    spec = tiny_spec(steps=8, eval_every=2)
    train(spec, options(tmp_path / "run", max_steps=3))
    capsys.readouterr()
    result = train(spec, options(tmp_path / "run", resume=True, max_steps=2))  # quiet
    assert (result.stopped, result.step) == ("max-steps", 3)
    assert (
        capsys.readouterr().out
        == "note: the run is already at step 3, past --max-steps 2: it trains no further\n"
    )


def test_a_missing_tensorboard_is_said_before_the_data_is_read(tmp_path, monkeypatch):
    from flowspec.train import trainer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if it were not installed
    monkeypatch.setattr(trainer, "load_split", lambda *args, **kwargs: pytest.fail("the data was read"))
    with pytest.raises(UserError, match="--tensorboard needs the tensorboard package"):
        Trainer(tiny_spec(), options(tmp_path / "run", tensorboard=True))
    assert not (tmp_path / "run").exists()


def test_the_progress_bar_is_closed_when_the_run_fails_at_its_first_line(tmp_path, monkeypatch):
    from flowspec.train import progress, trainer

    closed = []
    monkeypatch.setattr(progress.Reporter, "close", lambda self: closed.append(True))
    monkeypatch.setattr(trainer.Trainer, "_banner", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train(tiny_spec(), options(tmp_path / "run"))
    assert closed
