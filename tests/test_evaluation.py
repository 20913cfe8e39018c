"""Evaluation during training: the `eval` settings, their cost limits, the order of checkpoint and
evaluation, progress, and stop signals during evaluation and sampling."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from train_helpers import tiny_spec, write_flow, write_shards

import flowspec
from flowspec.cli.app import run
from flowspec.diagnostics import SpecError
from flowspec.errors import UserError
from flowspec.formatter import format_spec
from flowspec.loader import parse_spec
from flowspec.model import FlowModel
from flowspec.spec import EvalSpec, Interval
from flowspec.train import evaluation as evaluation_module
from flowspec.train import trainer
from flowspec.train.checkpoint import load_checkpoint
from flowspec.train.data import load_split
from flowspec.train.evaluate import bounds, single_sample_bpd
from flowspec.train.evaluation import Evaluator
from flowspec.train.memory import PeakMemory
from flowspec.train.metrics import is_eval
from flowspec.train.progress import Reporter, duration
from flowspec.train.signals import StoppedBySignal, never
from flowspec.train.trainer import RunOptions, train

CPU = torch.device("cpu")

TINY = """\
model tiny
data digits { shape 1x8x8  levels 17 }
flow { split checkerboard { coupling affine(filters=4, blocks=1); flip } }
"""


# ---------------------------------------------------------------- the `eval` section


def test_eval_section_reads_formats_and_overrides():
    spec = parse_spec(TINY + "eval { images 64  samples 16  temperatures 1.0  inversion off }")
    assert spec.eval == EvalSpec(images=64, samples=16, temperatures=(1.0,), inversion=False)
    assert parse_spec(TINY).eval == EvalSpec()  # all images, the train batch, 2 grids of 64, inversion on
    assert "eval {" not in format_spec(parse_spec(TINY))
    text = format_spec(spec)
    assert "eval { images 64  samples 16  temperatures (1.0)  inversion off }" in text
    assert parse_spec(text) == spec
    changed = parse_spec(TINY, overrides=["eval.batch=8", "eval.images=all", "eval.temperatures=(0.7, 1)"])
    assert changed.eval == EvalSpec(batch=8, temperatures=(0.7, 1.0))


def test_eval_section_merges_over_an_extended_spec(tmp_path):
    base = tmp_path / "base.flow"
    base.write_text(TINY + "eval { images 100  samples 4 }\n")
    child = f'extends "{base.name}"\nmodel child\neval {{ samples 9 }}\n'
    spec = parse_spec(child, source=str(tmp_path / "child.flow"))
    assert (spec.eval.images, spec.eval.samples) == (100, 9)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("eval { images 0 }", "images must be >= 1, got 0"),
        ("eval { imagse 3 }", "did you mean 'images'"),
        ("eval { temperatures (0.5, 0) }", "temperatures must lie in (0, 10]"),
        ("eval { temperatures () }", "temperatures needs at least one value"),
        ("eval { inversion maybe }", "inversion must be on or off"),
        ("eval { samples 3  samples 4 }", "duplicate setting 'samples' in eval"),
    ],
)
def test_eval_section_mistakes_name_the_place(text, message):
    with pytest.raises(SpecError) as error:
        parse_spec(TINY + text, source="e.flow")
    assert message in str(error.value) and "e.flow:4:" in str(error.value)


# ---------------------------------------------------------------- evaluation in a run


def _options(out, **kw) -> RunOptions:
    return RunOptions(out=out, device="cpu", quiet=True, **kw)


def test_the_checkpoint_is_written_before_each_evaluation_and_again_when_it_improved(tmp_path, monkeypatch):
    events = []
    save = trainer.save_run
    evaluate = Evaluator.__call__

    def saving(run_dir, payload, best, *modules, last=True):
        assert last  # evaluations at the interval and at the end: both checkpoints
        events.append(("save", payload["step"], best, payload["best_bpd"]))
        return save(run_dir, payload, best, *modules, last=last)

    def evaluating(self, model, step, *args, **kw):
        events.append(("eval", step, load_checkpoint(self.run_dir)["step"]))  # on disk already
        return evaluate(self, model, step, *args, **kw)

    monkeypatch.setattr(trainer, "save_run", saving)
    monkeypatch.setattr(Evaluator, "__call__", evaluating)
    quick = {"images": 32, "samples": 4, "inversion": False}
    result = train(tiny_spec(steps=4, eval_every=2), _options(tmp_path / "run", eval=quick))
    first, second = (r["test_bpd"] for r in result.history if is_eval(r))
    assert events[:3] == [("save", 2, False, None), ("eval", 2, 2), ("save", 2, True, first)]
    assert events[3:5] == [("save", 4, False, first), ("eval", 4, 4)]
    assert events[5:] == ([("save", 4, True, second)] if second < first else [])


def test_evaluation_follows_the_eval_settings_without_gradients(tmp_path, monkeypatch):
    calls = []
    log_prob = FlowModel.log_prob

    def spy(self, x):
        calls.append((len(x), torch.is_grad_enabled(), self.training))
        return log_prob(self, x)

    spec = tiny_spec(steps=2, eval_every=2).model_copy(
        update={"eval": EvalSpec(images=40, batch=8, samples=4, temperatures=(1.0,), inversion=False)}
    )
    monkeypatch.setattr(FlowModel, "log_prob", spy)
    result = train(spec, _options(tmp_path / "run"))
    row = result.history[-1]
    assert row["test_images"] == 40 and row["inversion_error"] is None  # not measured: null in the JSON
    evaluation = calls[-5:]  # after the training steps: 5 batches of 8 test images, no autograd, eval mode
    assert evaluation == [(8, False, False)] * 5
    assert [p.name for p in (tmp_path / "run" / "samples").iterdir()] == ["step0000002_t1.0.png"]
    size = 2 * (16 * 8 + 2) + 2  # 2 x 2 images of 8 px, enlarged 16 times (>= 256 px wide), 2 px padding
    assert Image.open(tmp_path / "run" / "samples" / "step0000002_t1.0.png").size == (size, size)
    # the command line's settings win over the spec's
    checked = []
    inversion = evaluation_module.inversion_error
    monkeypatch.setattr(
        evaluation_module,
        "inversion_error",
        lambda model, x, *rest: (checked.append(len(x)), inversion(model, x, *rest))[1],
    )
    again = train(spec, _options(tmp_path / "again", eval={"images": 24, "inversion": True}))
    assert again.history[-1]["test_images"] == 24 and again.history[-1]["inversion_error"] < 1e-3
    assert checked == [8]  # one evaluation batch of the test images


def test_a_short_run_evaluates_little_and_says_so(tmp_path, capsys):
    spec = tiny_spec(steps=100, eval_every=10)
    train(spec, RunOptions(out=tmp_path / "run", device="cpu", max_steps=2))
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("a short run"))
    assert "step 2, before the first evaluation at step 10" in line
    assert "64 of 297 test images at batch 16, one 16-image grid, no inversion check" in line
    assert "evaluated 64 test images in" in printed and "peak memory" in printed
    assert [p.name for p in (tmp_path / "run" / "samples").iterdir()] == ["step0000002_t1.0.png"]
    # a run that reaches its interval evaluates in full
    resumed = train(spec, _options(tmp_path / "run", resume=True, max_steps=10, eval={"samples": 0}))
    assert resumed.history[-1]["test_images"] == 297


def test_a_short_run_keeps_the_eval_settings_of_the_command_lines_set(tmp_path, capsys):
    """`--set eval.images=16` is the user's word for this run, like `--eval-images 16`: not replaced by the
    short run's 64 images; what the spec file says is."""
    flow = write_flow(tmp_path / "tiny.flow", steps=100, eval_every=10)
    sets = ["eval.images=16", "eval.samples=4"]
    result = flowspec.train(flow, out=tmp_path / "run", max_steps=2, device="cpu", sets=sets)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("a short run"))
    assert "evaluates 16 of 297 test images at batch 16, one 4-image grid, no inversion check" in line
    assert result.history[-1]["test_images"] == 16
    size = 2 * (16 * 8 + 2) + 2  # a 2 x 2 grid
    assert Image.open(tmp_path / "run" / "samples" / "step0000002_t1.0.png").size == (size, size)
    assert (
        run(["ablate", str(flow), "--steps", "2", "--set", "eval.images=24", "-o", str(tmp_path / "a")]) == 0
    )
    assert "evaluates 24 of 297 test images" in capsys.readouterr().out


def test_a_stopped_evaluation_keeps_the_checkpoint_and_runs_when_resumed(tmp_path, monkeypatch):
    evaluate = Evaluator.__call__

    def interrupted(self, model, step, meters=None, stop=never):
        os.kill(os.getpid(), signal.SIGINT)  # noted; the evaluation stops before its first batch
        return evaluate(self, model, step, meters, stop)

    monkeypatch.setattr(Evaluator, "__call__", interrupted)
    spec, run_dir = tiny_spec(steps=4, eval_every=2), tmp_path / "run"
    result = train(spec, _options(run_dir))
    assert result.stopped == "SIGINT" and result.step == 2 and not [r for r in result.history if is_eval(r)]
    assert load_checkpoint(run_dir)["step"] == 2
    monkeypatch.setattr(Evaluator, "__call__", evaluate)
    resumed = train(spec, _options(run_dir, resume=True))
    evaluations = [r for r in resumed.history if is_eval(r)]
    assert [r["step"] for r in evaluations] == [2, 4]  # the evaluation at step 2 runs first
    straight = train(spec, _options(tmp_path / "straight"))
    assert _untimed(resumed.history) == _untimed(straight.history)  # its train means too (kept in last.pt)


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("img_s", "eval_seconds")} for r in rows]


@pytest.mark.parametrize(
    ("steps", "eval_every", "signal_at"),
    [(7, 3, 7), (8, 4, 6)],
    ids=["at-the-last-step", "between-evaluations"],
)
def test_a_signal_then_resume_gives_the_uninterrupted_run(
    tmp_path, monkeypatch, steps, eval_every, signal_at
):
    """The same checkpoints, best.pt and metrics rows (train means included): a signal after the last
    step (its length not a multiple of `eval every`) still gets the final evaluation on resuming."""
    from flowspec.train.update import Updater

    spec = tiny_spec(steps=steps, eval_every=eval_every)
    straight = train(spec, _options(tmp_path / "straight", log_every=1))
    _signal_on_call(monkeypatch, Updater, "__call__", signal.SIGINT, call=signal_at)
    stopped = train(spec, _options(tmp_path / "split", log_every=1))
    assert stopped.stopped == "SIGINT" and stopped.step == signal_at
    monkeypatch.undo()
    resumed = train(spec, _options(tmp_path / "split", resume=True, log_every=1))
    assert resumed.stopped == "finished" and resumed.history[-1]["step"] == steps
    assert _untimed(resumed.history) == _untimed(straight.history)
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(tmp_path / "straight" / name), load_checkpoint(tmp_path / "split" / name)
        assert (a["step"], a["best_bpd"]) == (b["step"], b["best_bpd"])
        assert all(torch.equal(a["model"][k], v) for k, v in b["model"].items())


def test_bounds_and_grids_stop_between_batches():
    spec = tiny_spec()
    model = flowspec.build(spec)
    images = load_split(spec.data, "test").images[:40]
    model.initialize(images)
    asked = []

    def stop_at_third():
        asked.append(1)
        return "SIGTERM" if len(asked) == 3 else None

    with pytest.raises(StoppedBySignal) as stopped:
        single_sample_bpd(model, images, 8, CPU, stop=stop_at_third)
    assert stopped.value.done == "after 16 of 40 test images" and stopped.value.exit_code == 143
    asked.clear()
    with pytest.raises(StoppedBySignal, match="after 8 of 40 images"):
        bounds(
            model, images, 1, 4, CPU, stop=lambda: "SIGINT" if len(asked.append(1) or asked) == 3 else None
        )


# ---------------------------------------------------------------- signals on the command line

ROOT = Path(__file__).resolve().parent.parent


def test_sigint_during_the_evaluation_keeps_the_checkpoint_and_exits_130(tmp_path, capsys):
    flow = write_flow(tmp_path / "tiny.flow", steps=100, eval_every=50)
    shards = write_shards(tmp_path / "shards", n_train=64, n_test=20000)  # at batch 1: a minute to evaluate
    out = tmp_path / "run"
    command = [sys.executable, "-m", "flowspec", "train", str(flow), "--set", "data.dataset=npz"]
    command += ["--data", str(shards), "--out", str(out), "--device", "cpu", "--max-steps", "1"]
    command += ["--eval-images", "20000", "--eval-batch", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines = []
    while not lines or not lines[-1].startswith("a short run"):  # printed as the evaluation starts
        lines.append(proc.stdout.readline())
        assert lines[-1], "".join(lines) + proc.stderr.read()
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + stderr
    said = [line for line in stdout.splitlines() if "SIGINT" in line]
    assert len(said) == 1 and said[0].startswith("SIGINT: the evaluation at step 1 stopped after ")
    assert f"{out / 'last.pt'} was saved before it" in said[0] and "Traceback" not in stderr
    assert load_checkpoint(out)["step"] == 1
    assert run(["eval", str(out), "--images", "8", "--device", "cpu", "--data", str(shards)]) == 0  # it loads


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_spec(steps=2), _options(out, eval={"samples": 0}))
    return out


def _signal_on_call(monkeypatch, owner, name, signum, call=1):
    """Make the `call`-th call of `owner.name` send `signum` to this process first."""
    original, calls = getattr(owner, name), []

    def wrapped(*args, **kw):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return original(*args, **kw)

    monkeypatch.setattr(owner, name, wrapped)


def test_eval_and_sample_stop_between_batches_on_a_signal(trained, tmp_path, monkeypatch, capsys):
    _signal_on_call(monkeypatch, FlowModel, "log_prob", signal.SIGTERM, call=2)
    assert run(["eval", str(trained), "--batch", "8", "--images", "40", "--device", "cpu"]) == 143
    err = capsys.readouterr().err
    assert err == "SIGTERM: the evaluation stopped after 16 of 40 images; nothing was written\n"
    assert not (trained / "eval_test.json").exists()
    _signal_on_call(monkeypatch, FlowModel, "sample", signal.SIGINT)
    grid = tmp_path / "grid.png"
    assert run(["sample", str(trained), "-n", "8", "--batch", "4", "-o", str(grid), "--device", "cpu"]) == 130
    err = capsys.readouterr().err
    assert err == "SIGINT: sampling stopped after 4 of 8 samples at temperature 1.0; nothing was written\n"
    assert not grid.exists()


def test_a_signal_during_the_last_batch_of_eval_or_sample_still_stops_it(
    trained, tmp_path, monkeypatch, capsys
):
    """The default sample grid is one batch: a Ctrl-C during it stops the command too."""
    _signal_on_call(monkeypatch, FlowModel, "log_prob", signal.SIGINT, call=1)
    out = tmp_path / "e.json"
    assert run(["eval", str(trained), "--images", "8", "--device", "cpu", "-o", str(out)]) == 130
    assert capsys.readouterr().err.startswith(
        "SIGINT: the evaluation stopped after all 8 images, before writing"
    )
    assert not out.exists()
    _signal_on_call(monkeypatch, FlowModel, "sample", signal.SIGTERM)
    grid = tmp_path / "grid.png"
    assert run(["sample", str(trained), "-n", "4", "-o", str(grid), "--device", "cpu"]) == 143
    assert (
        "sampling stopped after all 4 samples at temperature 1.0, before writing" in capsys.readouterr().err
    )
    assert not grid.exists()


def test_ablate_stops_at_a_signal_and_compares_nothing(tmp_path, monkeypatch, capsys):
    first, second = write_flow(tmp_path / "a.flow", name="a"), write_flow(tmp_path / "b.flow", name="b")
    _signal_on_call(monkeypatch, Evaluator, "__call__", signal.SIGINT)
    out = tmp_path / "ablation"
    assert (
        run(["ablate", str(first), str(second), "--steps", "2", "--out", str(out), "--device", "cpu"]) == 130
    )
    captured = capsys.readouterr()
    assert "SIGINT: the evaluation at step 2 stopped after 0 of 64 test images" in captured.out
    assert f"Continue with: flowspec ablate --resume {out}" in captured.out  # not one run's own resume
    assert (
        captured.err
        == "SIGINT: the ablation stopped in the run of a (step 2); 0 of 2 runs done; nothing was compared; "
        f"finish it with: flowspec ablate --resume {out}\n"
    )
    assert load_checkpoint(out / "a")["step"] == 2 and not (out / "b").exists()
    assert not (out / "ablation.json").exists()


def test_ablate_stopped_in_its_second_run_compares_the_first(tmp_path, monkeypatch, capsys):
    first, second = write_flow(tmp_path / "a.flow", name="a"), write_flow(tmp_path / "b.flow", name="b")
    _signal_on_call(monkeypatch, Evaluator, "__call__", signal.SIGTERM, call=2)  # b's evaluation
    out = tmp_path / "ablation"
    args = ["ablate", str(first), str(second), "--steps", "2", "--out", str(out), "--device", "cpu", "-q"]
    assert run(args) == 143
    captured = capsys.readouterr()
    assert captured.err == (
        f"SIGTERM: the ablation stopped in the run of b (step 2); 1 of 2 runs done; the table compares the 1 "
        f"finished; finish it with: flowspec ablate --resume {out}\n"
    )
    assert "test bits/dim" in captured.out and "│ a " in captured.out and "│ b " not in captured.out
    assert [r["spec"] for r in json.loads((out / "ablation.json").read_text())] == ["a"]
    assert load_checkpoint(out / "b")["step"] == 2


def test_only_the_main_process_says_that_an_ablation_stopped(tmp_path, monkeypatch, capsys):
    """Under torchrun every rank printed the stop line, rank 1's wrong ("1 of 2 runs done; nothing was
    compared": it holds no table) while rank 0 compared the finished run."""
    from flowspec.train import distributed

    first, second = write_flow(tmp_path / "a.flow", name="a"), write_flow(tmp_path / "b.flow", name="b")
    _signal_on_call(monkeypatch, Evaluator, "__call__", signal.SIGTERM, call=2)  # b's evaluation
    monkeypatch.setattr(distributed, "main_process", lambda: False)  # the command line of rank 1
    out = tmp_path / "ablation"
    args = ["ablate", str(first), str(second), "--steps", "2", "--out", str(out), "--device", "cpu", "-q"]
    assert run(args) == 143
    assert capsys.readouterr() == ("", "")


def test_an_interrupted_ablation_resumed_compares_what_the_uninterrupted_one_does(
    tmp_path, monkeypatch, capsys
):
    """Stopped in its second run's first evaluation, an ablation finishes with `--resume`: the first
    run is not trained again, the second goes on from its checkpoint and the third starts; the table is
    the uninterrupted ablation's."""
    from flowspec.train import ablate

    specs = [str(write_flow(tmp_path / f"{n}.flow", name=n, filters=4 + 2 * i)) for i, n in enumerate("abc")]
    fixed = ["--steps", "4", "--device", "cpu", "-q", "--eval-samples", "0", "--seed", "3"]
    assert run(["ablate", *specs, "--out", str(tmp_path / "whole"), *fixed]) == 0
    whole = json.loads((tmp_path / "whole" / "ablation.json").read_text())
    out = tmp_path / "ablation"
    _signal_on_call(monkeypatch, Evaluator, "__call__", signal.SIGINT, call=3)  # b's at step 3
    assert run(["ablate", *specs, "--out", str(out), *fixed]) == 130
    assert f"finish it with: flowspec ablate --resume {out}" in capsys.readouterr().err
    assert load_checkpoint(out / "b")["step"] == 3 and not (out / "c").exists()
    monkeypatch.undo()
    trained = []
    real_train = ablate.train
    monkeypatch.setattr(
        ablate,
        "train",
        lambda spec, o, **kw: trained.append((spec.name, o.resume)) or real_train(spec, o, **kw),
    )
    assert run(["ablate", "--resume", str(out), "-q"]) == 0
    assert trained == [("b", True), ("c", False)]
    assert "ablation (4 steps each, seed 3)" in capsys.readouterr().out
    rows = json.loads((out / "ablation.json").read_text())
    same = ("spec", "parameters", "test bits/dim", "test images", "best bits/dim", "steps", "file")
    assert [{k: r[k] for k in same} for r in rows] == [{k: r[k] for k in same} for r in whole]
    assert run(["ablate", "--resume", str(out), "-q"]) == 0 and len(trained) == 2  # all done: the table
    assert json.loads((out / "ablation.json").read_text()) == rows


def test_ablate_resume_of_an_ablation_from_before_plans_says_to_run_it_again(tmp_path, capsys):
    """An older flowspec's ablation (ablation.json and run folders, no ablation-plan.json) cannot be
    resumed: the message says so and gives the command that runs it again, from the files it names."""
    out = tmp_path / "old"
    (out / "a").mkdir(parents=True)
    rows = [{"spec": m, "file": str(tmp_path / f"{m} x.flow"), "overrides": ["train.lr=1e-3"]} for m in "ab"]
    (out / "ablation.json").write_text(json.dumps(rows))
    assert run(["ablate", "--resume", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{out} holds an ablation written by an older flowspec" in err and "cannot be resumed" in err
    again = (
        f"flowspec ablate '{tmp_path}/a x.flow' '{tmp_path}/b x.flow' --set train.lr=1e-3 --out NEW_FOLDER"
    )
    assert again in err and "expected" not in err
    (out / "ablation.json").write_text(json.dumps([{"spec": "a"}, {"spec": "b"}]))  # before it named files
    assert run(["ablate", "--resume", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "run `flowspec ablate` again with the spec files it compared (a, b) and its options" in err


def test_ablate_resume_takes_only_how_to_run_from_the_command_line(tmp_path, capsys):
    spec = str(write_flow(tmp_path / "a.flow", name="a"))
    out = tmp_path / "ablation"
    assert run(["ablate", "--resume", str(out)]) == 2
    assert (
        f"{out} holds no ablation to resume: expected {out / 'ablation-plan.json'}" in capsys.readouterr().err
    )
    assert run(["ablate", "--device", "cpu"]) == 2
    assert "ablate needs the specs to compare (or --resume DIR" in capsys.readouterr().err
    assert run(["ablate", spec, "--steps", "1", "--out", str(out), "--device", "cpu", "-q"]) == 0
    for extra in (
        [spec],
        ["--steps", "2"],
        ["--seed", "0"],
        ["--set", "train.lr=0.1"],
        ["--precision", "bf16"],
    ):
        assert run(["ablate", "--resume", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: ablate --resume {out} finishes the ablation with its own specs and")
        assert ("specs" if extra == [spec] else extra[0]) in err
    assert run(["ablate", "--resume", str(out), "--device", "cpu", "--threads", "1", "-q"]) == 0
    capsys.readouterr()
    plan = out / "ablation-plan.json"
    good = json.loads(plan.read_text())
    assert good["options"]["threads"] is None and good["options"]["max_steps"] == 1  # as given
    edits = {  # a plan that is not one flowspec wrote: damaged, named, no traceback
        "truncated": (lambda text: text[:100], "Invalid JSON"),
        "no runs": (
            lambda text: json.dumps(json.loads(text) | {"runs": []}),
            "runs: List should have at least",
        ),
        "results a list": (
            lambda text: json.dumps(json.loads(text) | {"results": []}),
            "results: Input should",
        ),
        "a result's field renamed": (
            lambda text: text.replace('"best_scheduled"', '"best_sheduled"'),
            "results.a.best_scheduled: Field required",
        ),
        "two budgets": (lambda text: text.replace('"max_run_time": null', '"max_run_time": 5.0'), "one of"),
        "bad eval": (
            lambda text: text.replace('"eval": {}', '"eval": {"images": -5}'),
            "images: Input should",
        ),
    }
    for name, (edit, said) in edits.items():
        plan.write_text(edit(json.dumps(good)))
        assert run(["ablate", "--resume", str(out)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"error: {plan} is damaged (") and said in err, (name, err)
    plan.write_text(json.dumps(good | {"results": {}, "options": good["options"] | {"device": "cuda"}}))
    if not torch.cuda.is_available():  # the plan's device, checked before any run
        assert run(["ablate", "--resume", str(out)]) == 2
        assert "cuda" in capsys.readouterr().err and not (out / "a.before").exists()


def test_an_ablation_resumed_starts_again_a_run_that_stopped_before_its_first_checkpoint(
    tmp_path, monkeypatch, capsys
):
    """A crash before a run's first checkpoint leaves files and no last.pt: the resume moves them aside
    and trains the run again (a run trained on outside the ablation is said, its row kept); and a signal
    after the last run changes nothing."""
    from flowspec.train import ablate

    specs = [str(write_flow(tmp_path / f"{n}.flow", name=n)) for n in "ab"]
    out = tmp_path / "ablation"
    args = ["--steps", "3", "--device", "cpu", "-q", "--eval-samples", "0"]
    assert run(["ablate", *specs, "--out", str(out), *args]) == 0
    whole = json.loads((out / "ablation.json").read_text())
    plan = json.loads((out / "ablation-plan.json").read_text())
    del plan["results"]["b"]
    (out / "ablation-plan.json").write_text(json.dumps(plan))
    for name in ("last.pt", "best.pt"):
        (out / "b" / name).unlink()
    outside = ["--max-steps", "4", "-q", "--eval-samples", "0", "--eval-images", "16"]
    assert run(["train", "--resume", str(out / "a"), *outside]) == 0
    capsys.readouterr()
    plot = ablate.plot_curves

    def signalled(*args, **kwargs):  # after every run
        os.kill(os.getpid(), signal.SIGINT)
        return plot(*args, **kwargs)

    monkeypatch.setattr(ablate, "plot_curves", signalled)
    assert run(["ablate", "--resume", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    aside = [p for p in out.iterdir() if p.name.startswith("b.before-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").exists() and not (aside[0] / "last.pt").exists()
    assert (
        f"note: b had stopped before its first checkpoint: it starts again; its files are in {aside[0]}"
        in printed
    )
    assert "note: a was trained on outside the ablation (to step 4); its row is step 3" in printed
    same = ("spec", "test bits/dim", "test images", "steps")  # a's at step 3, as the ablation measured it
    rows = json.loads((out / "ablation.json").read_text())
    assert [{k: r[k] for k in same} for r in rows] == [{k: r[k] for k in same} for r in whole]


def test_a_runs_training_time_counts_over_its_processes(tmp_path):
    """`max_run_time` (an ablation's --budget) counts the training of the processes before this one: a
    run resumed after its budget trains no further step, and evaluates where it stopped."""
    spec, run_dir = tiny_spec(steps=8, eval_every=4), tmp_path / "run"
    train(spec, _options(run_dir, max_steps=2, eval={"samples": 0}))
    first = load_checkpoint(run_dir)["train_seconds"]
    assert first > 0
    result = train(spec, _options(run_dir, resume=True, max_run_time=first / 2, eval={"samples": 0}))
    assert (result.step, result.stopped) == (2, "max-time")
    result = train(spec, _options(run_dir, resume=True, max_steps=3, eval={"samples": 0}))
    assert result.step == 3 and load_checkpoint(run_dir)["train_seconds"] > first


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_peak_memory_counts_from_its_start():
    memory = PeakMemory(CPU)
    block = torch.ones(50_000_000)  # 200 MB
    block.add_(1)
    del block
    peak, kind = memory.read()
    assert kind == "resident" and peak >= memory.start + 150e6
    assert str(memory).startswith("peak memory ") and "GB at the start" in str(memory)


def test_a_run_resumes_with_other_eval_settings_but_not_other_training(tmp_path):
    spec, run_dir = tiny_spec(steps=4, eval_every=2), tmp_path / "run"
    train(spec, _options(run_dir, max_steps=2, eval={"samples": 0}))
    every_step = spec.train.model_copy(update={"save_every": Interval(count=1, unit="steps")})
    saving = spec.model_copy(update={"train": every_step})  # checkpoints more often: no other training
    assert train(saving, _options(run_dir, resume=True, max_steps=3, eval={"samples": 0})).step == 3
    cheaper = spec.model_copy(update={"eval": EvalSpec(images=16, samples=0)})
    assert train(cheaper, _options(run_dir, resume=True)).history[-1]["test_images"] == 16
    faster = spec.model_copy(update={"train": spec.train.model_copy(update={"lr": 0.1})})
    with pytest.raises(UserError, match="different spec"):
        train(faster, _options(run_dir, resume=True))


def test_a_resumed_run_keeps_the_eval_options_it_was_given_until_given_again(tmp_path):
    """`--eval-samples 0 --eval-batch 1` were not kept: `train --resume RUN` (as the stop line advises)
    evaluated at the default batch and drew sample grids, where `--set eval.samples=0` was kept."""
    spec, run_dir = tiny_spec(steps=8, eval_every=4), tmp_path / "run"
    given = {"samples": 0, "images": 8}
    train(spec, _options(run_dir, max_steps=2, eval=given, eval_options=given))
    assert load_checkpoint(run_dir)["eval_options"] == {"samples": 0, "images": 8}
    assert train(spec, _options(run_dir, resume=True, max_steps=4)).history[-1]["test_images"] == 8
    assert not (run_dir / "samples").exists()
    again = train(
        spec, _options(run_dir, resume=True, max_steps=6, eval={"images": 16}, eval_options={"images": 16})
    )
    assert again.history[-1]["test_images"] == 16 and not (run_dir / "samples").exists()
    assert load_checkpoint(run_dir)["eval_options"] == {"samples": 0, "images": 16}


def test_set_eval_settings_live_in_the_runs_spec_not_among_its_recorded_options(tmp_path):
    """`--set eval.NAME` is the run's spec (a later spec file's eval section replaces it at resume), and
    any eval setting may be written so (temperatures too): none is recorded as an --eval-* option."""
    flow, run_dir = write_flow(tmp_path / "tiny.flow", steps=8, eval_every=4), tmp_path / "run"
    sets = ["eval.temperatures=(0.5, 0.7)", "eval.images=8", "eval.samples=0"]
    flowspec.train(flow, out=run_dir, device="cpu", quiet=True, max_steps=2, sets=sets)
    assert load_checkpoint(run_dir)["eval_options"] == {}
    changed = tmp_path / "changed.flow"
    changed.write_text(flow.read_text() + "eval { images 16  samples 0 }\n")
    resumed = flowspec.train(changed, resume=run_dir, device="cpu", quiet=True, max_steps=4)
    assert resumed.history[-1]["test_images"] == 16


def test_meter_shows_images_running_bits_and_time_left(capsys):
    meter = Reporter("lines", None, 0, every_s=0.0, train=False).meter("eval", 40, "test images")
    meter(8, 3.25)
    meter(8, 3.0)
    meter.close()
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("eval 8/40 test images  3.2500 bits/dim  ") and first.endswith("s left")
    assert second.startswith("eval 16/40 test images  3.0000 bits/dim  ")
    assert [duration(s) for s in (42, 185, 7800, math.nan)] == ["42s", "3m05s", "2h10m", "?"]
