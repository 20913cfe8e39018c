"""`flowspec train` on the command line: exit codes and messages, SIGINT/SIGTERM, resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import tiny_spec, write_flow

import flowspec
from flowspec.cli.app import run
from flowspec.cli.training import parse_duration
from flowspec.loader import is_run_spec
from flowspec.train.checkpoint import LAST, checkpoint_spec, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_and_resume_from_the_command_line(tmp_path, capsys):
    flow = write_flow(tmp_path / "tiny.flow", steps=6, eval_every=3)
    out = tmp_path / "run"
    args = ["train", str(flow), "--out", str(out), "--device", "cpu", "--max-steps", "3", "--threads", "1"]
    assert run([*args, "--recompute", "off"]) == 0
    printed = capsys.readouterr().out
    assert "device cpu, threads 1 (--threads)" in printed and "recompute off, 1 process;" in printed
    assert "training tiny" in printed and "step 3" in printed and "done (max-steps) at step 3" in printed
    assert "(best.pt: " in printed and "the best scheduled evaluation)" in printed
    assert flowspec.load_spec(out / "spec.flow") == flowspec.load_spec(flow)
    written = (out / "spec.flow").read_text()
    assert run(["train", "--resume", str(out / LAST), "--quiet"]) == 0  # the stored spec, to its length
    assert (out / "spec.flow").read_text() == written  # still saying where it came from
    assert capsys.readouterr().out == ""
    assert load_checkpoint(out)["step"] == 6
    # --set without a spec changes the run's own spec.flow (an eval setting: the rest must stay)
    assert run(["train", "--resume", str(out), "--quiet", "--set", "eval.images=4"]) == 0
    assert flowspec.load_spec(out / "spec.flow").eval.images == 4
    assert (out / "spec.flow").read_text().splitlines()[0] == written.splitlines()[0]  # from the same file
    # a finished run writes no checkpoint for it, and a later --resume without a spec keeps it (it was
    # rewritten from the checkpoint's spec)
    recorded = {name: (out / name).read_bytes() for name in ("spec.json", "spec.flow")}
    assert checkpoint_spec(load_checkpoint(out), out).eval.images != 4
    assert run(["train", "--resume", str(out), "--quiet"]) == 0
    assert {name: (out / name).read_bytes() for name in recorded} == recorded


def test_resume_set_without_a_spec_applies_to_the_stored_spec_of_a_run_named_in_python(tmp_path, capsys):
    spec = tiny_spec(steps=3, eval_every=3, name="my tiny model-1.0")  # no spec file could write the name
    flowspec.train(spec, out=tmp_path / "run", max_steps=2, quiet=True)
    resume = ["train", "--resume", str(tmp_path / "run"), "-q"]
    assert run([*resume, "--set", "eval.images=8", "--max-steps", "2"]) == 0  # trains no further
    assert checkpoint_spec(load_checkpoint(tmp_path / "run"), tmp_path).eval.images != 8
    assert run(resume) == 0  # a resume without a spec goes on with what the last one recorded
    payload = load_checkpoint(tmp_path / "run")
    assert payload["step"] == 3 and checkpoint_spec(payload, tmp_path).eval.images == 8
    assert json.loads((tmp_path / "run" / "spec.json").read_text())["eval"]["images"] == 8
    assert run(["train", "--resume", str(tmp_path / "nowhere"), "--set", "eval.images=8"]) == 2
    assert "nowhere does not exist" in (err := capsys.readouterr().err) and "spec.flow" not in err
    assert run(["train", "--resume", str(tmp_path / "run"), "--set", "train.lr=1e-2"]) == 2
    assert "a resume may change only the eval settings and `save every`" in capsys.readouterr().err


def test_resuming_a_run_still_writing_its_first_checkpoint_names_the_holder(tmp_path, capsys):
    from train_helpers import ELSEWHERE, held_by_another_process

    with held_by_another_process(tmp_path / "run"):
        assert run(["train", "--resume", str(tmp_path / "run")]) == 2
    assert "run folder" in (err := capsys.readouterr().err) and f"is in use by {ELSEWHERE}" in err
    assert "no checkpoint" not in err


def test_the_run_folder_spec_is_the_model_trained_with_its_base_and_overrides(tmp_path, capsys):
    """`spec.flow` in a run folder is the resolved spec: `diff` against the file it came from shows the
    --set change, and it reads without the base file it extended."""
    (tmp_path / "specs").mkdir()
    base = write_flow(tmp_path / "specs" / "tiny.flow", steps=2, eval_every=2)
    child = tmp_path / "specs" / "child.flow"
    child.write_text('extends "tiny.flow"\nmodel child\n')
    out = tmp_path / "run"
    args = ["train", str(child), "--out", str(out), "--set", "defaults.coupling.filters=4", "--quiet"]
    assert run([*args, "--device", "cpu", "--threads", "1"]) == 0
    stored = out / "spec.flow"
    assert stored.read_text().startswith(f"# the resolved spec of a trained run, from {child}\n")
    assert (
        flowspec.load_spec(stored).flow
        == flowspec.load_spec(child, overrides=["defaults.coupling.filters=4"]).flow
    )
    assert run(["diff", str(base), str(stored)]) == 0
    assert "filters" in capsys.readouterr().out
    assert run(["show", str(out)]) == 2
    assert f"(a run folder's spec is {stored})" in capsys.readouterr().err


def test_an_older_run_folder_spec_copied_from_its_spec_file_is_read_from_spec_json(
    tmp_path, capsys, monkeypatch
):
    """Before the resolved spec files, a run's spec.flow was a copy of the spec file it started from: its
    `extends` relative to where that file was, its --set overrides missing. Commands read the spec the
    run trained from spec.json instead (with a note), never the copy's other model."""
    monkeypatch.setenv("COLUMNS", "200")  # diff's table, unwrapped
    (tmp_path / "specs").mkdir()
    base = write_flow(tmp_path / "specs" / "tiny.flow", steps=2, eval_every=2)
    child = tmp_path / "specs" / "child.flow"
    child.write_text('extends "tiny.flow"\nmodel child\n')
    out, sets = tmp_path / "run", ["--set", "defaults.coupling.filters=4", "--set", "train.lr=1e-3"]
    args = ["--device", "cpu", "--threads", "1", "--quiet"]
    assert run(["train", str(child), "--out", str(out), *sets, "--max-steps", "1", *args]) == 0
    stored = out / "spec.flow"
    stored.write_text(child.read_text())  # what flowspec wrote before 85d291c
    trained = flowspec.load_spec(child, overrides=[s for s in sets if s != "--set"])
    capsys.readouterr()
    assert flowspec.load_spec(stored) == trained.model_copy(update={"source": str(stored)})
    note = f"note: {stored} was written by an older flowspec"
    assert note in capsys.readouterr().err
    assert run(["diff", str(stored), str(base)]) == 0
    printed = capsys.readouterr()
    assert "train.lr" in printed.out and "defaults.coupling.filters" in printed.out
    assert "run/spec.json / --set" not in printed.out and "run/spec.json / " in printed.out
    assert note in printed.err
    assert run(["show", str(stored), "--set", "eval.images=4"]) == 0
    shown = capsys.readouterr().out
    assert "filters=4" in shown.replace(" ", "") and "images 4" in shown
    (out / "tiny.flow").write_text(base.read_text().replace("filters=8", "filters=16"))  # another base
    assert flowspec.load_spec(stored).flow == trained.flow
    assert run(["train", str(stored), "--resume", str(out), *args]) == 0
    assert load_checkpoint(out)["step"] == 2
    assert stored.read_text().startswith("# the resolved spec of a trained run")  # written again
    capsys.readouterr()
    assert flowspec.load_spec(stored).flow == trained.flow and note not in capsys.readouterr().err
    # a copy that resolves to the spec the run trained is read as it is, without a note
    plain = tmp_path / "plain"
    assert run(["train", str(base), "--out", str(plain), "--max-steps", "1", *args]) == 0
    (plain / "spec.flow").write_text(base.read_text())
    capsys.readouterr()
    assert flowspec.load_spec(plain / "spec.flow") == flowspec.load_spec(base).model_copy(
        update={"source": str(plain / "spec.flow")}
    )
    assert "older flowspec" not in capsys.readouterr().err
    # a spec.json that cannot tell is refused, not guessed around
    (plain / "spec.json").write_text("{}")
    (plain / "spec.flow").write_text(child.read_text())
    assert run(["show", str(plain / "spec.flow")]) == 2
    assert "cannot be read to tell" in capsys.readouterr().err


def test_a_users_spec_flow_beside_another_tools_spec_json_is_read_as_written(tmp_path, capsys):
    """A spec.json that is not a flowspec spec makes no run folder of its own: the spec.flow beside it is a
    spec file like any (it was refused as an older run's copy that spec.json could not tell); with a run's
    metrics.jsonl or last.pt beside them it is a run's, whose damaged spec.json is refused."""
    own = tmp_path / "project"
    own.mkdir()
    flow = write_flow(own / "spec.flow", steps=2, eval_every=2)
    (own / "spec.json").write_text('{"other": "tool"}')
    copy = write_flow(tmp_path / "copy.flow", steps=2, eval_every=2)
    assert flowspec.load_spec(flow) == flowspec.load_spec(copy).model_copy(update={"source": str(flow)})
    assert run(["show", str(flow)]) == 0
    assert "model tiny" in capsys.readouterr().out
    assert not is_run_spec(flow)
    (own / "metrics.jsonl").write_text("")
    assert is_run_spec(flow)
    assert run(["show", str(flow)]) == 2
    assert "cannot be read to tell" in (err := capsys.readouterr().err) and "Traceback" not in err


def test_a_run_folder_spec_with_settings_a_set_made_unused_reads_back(tmp_path, capsys):
    """A base's `components=8` on a coupling that `--set` made affine does nothing and is allowed; it is
    held at its built-in value, so the run's spec.flow does not print it beside `affine` (which a
    hand-written file may not say) and reads back, also copied elsewhere."""
    base = tmp_path / "base.flow"
    base.write_text(
        "model b\ndata digits { shape 1x8x8  levels 17 }\ntrain { batch 16  length 2 steps }\n"
        "flow { split stripe { coupling(components=8, filters=4, blocks=1, heads=2); flip } }\n"
    )
    out, affine = tmp_path / "run", "flow.0.body.0.coupling=affine"
    args = ["--out", str(out), "--device", "cpu", "--threads", "1", "--quiet", "--eval-samples", "0"]
    assert run(["train", str(base), "--set", affine, "--max-steps", "1", *args]) == 0
    stored = out / "spec.flow"
    assert "coupling affine(" in stored.read_text() and "components" not in stored.read_text()
    assert flowspec.load_spec(stored) == flowspec.load_spec(base, [affine]).model_copy(
        update={"source": str(stored)}
    )
    capsys.readouterr()
    assert run(["show", str(stored)]) == 0 and run(["diff", str(base), str(stored)]) == 0
    assert run(["train", str(stored), "--resume", str(out), *args[2:]]) == 0
    hand_written = tmp_path / "copy.flow"  # elsewhere it is a spec file like any other
    hand_written.write_text(stored.read_text())
    assert flowspec.load_spec(hand_written).flow == flowspec.load_spec(stored).flow


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train"], "no spec given"),
        (["train", "{flow}", "--max-time", "5 parsecs"], "error: --max-time: expected a duration like 90s"),
        (["train", "{flow}", "--max-time", "0s"], "error: --max-time must be a duration above 0, like 90s"),
        (["train", "{flow}", "--set", "train.lr=2", "--resume", "{tmp}"], "no checkpoint in"),
        (["train", "--resume", "{tmp}/nowhere"], "does not exist"),
        (["train", "--resume", "{flow}"], "--resume takes a run folder (or its last.pt), got"),
        (["train", "{flow}", "--out", "{flow}"], "tiny.flow is a file: name a folder for the run"),
        (["export", "{tmp}", "-o", "{flow}/model.safetensors"], "tiny.flow is a file, not a folder"),
        (["eval", "{flow}"], "tiny.flow is a spec, not a checkpoint: pass a run folder or its last.pt"),
        (["train", "{flow}", "--out", "{tmp}/a", "--resume", "{tmp}/b"], "leave out --out"),
        (
            ["train", "{flow}", "--set", "data.dataset=npz"],
            "names no folder: pass the shard folder with --data",
        ),
        (
            ["train", "{flow}", "--set", "data.dataset=npz", "--data", "{tmp}/nowhere"],
            "does not exist: pass --data",
        ),
        (
            ["train", "{flow}", "--data", "{tmp}"],
            "dataset is digits (scikit-learn's bundled images), which reads no",
        ),
        (["eval", "{tmp}"], "no checkpoint in"),
        (["sample", "{tmp}/missing.pt"], "or a .safetensors file written by `flowspec export`"),
        (["ablate", "{flow}"], "exactly one budget"),
        (["ablate", "{flow}", "--steps", "2", "--budget", "1m"], "exactly one budget"),
        (
            ["ablate", "{flow}", "--budget", ""],
            "error: --budget: expected a duration like 90s, 30m or 2h, got ''",
        ),
        (
            ["ablate", "{flow}", "--budget", "0m"],
            "error: --budget must be a duration above 0, like 90s, 30m or 2h",
        ),
        (
            ["ablate", "{flow}", "--steps", "1", "--out", "{flow}"],
            "tiny.flow is a file: an ablation writes its",
        ),
    ],
)
def test_user_errors_exit_2_with_a_message(tmp_path, capsys, args, message):
    flow = write_flow(tmp_path / "tiny.flow")
    argv = [a.format(flow=flow, tmp=tmp_path) for a in args]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["--device", "tpu"],
        ["--precision", "fp16"],
        ["--recompute", "sometimes"],
        ["--max-steps", "0"],
        ["--bogus"],
    ],
)
def test_bad_options_are_usage_errors(tmp_path, capsys, args):
    flow = write_flow(tmp_path / "tiny.flow")
    assert run(["train", str(flow), *args]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_batch_the_training_set_cannot_fill_names_the_spec_and_the_batch_it_can(tmp_path, capsys):
    """train and ablate refuse it alike, naming the spec file and a --set that fixes it, before writing."""
    flow = write_flow(tmp_path / "tiny.flow")
    for command in (["train"], ["ablate", str(flow), "--steps", "1"]):
        out = str(tmp_path / command[0])
        assert run([*command, str(flow), "--set", "train.batch=4096", "--out", out, "--device", "cpu"]) == 2
        assert capsys.readouterr().err == (
            f"error: {flow}: the training set has 1500 images, fewer than one batch (4096): lower the batch "
            "to 1500 or fewer (--set train.batch=1500), or train on more images\n"
        )
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.flow"]


def test_parse_duration():
    assert [parse_duration(t) for t in ("90s", "30m", "2h", "1.5h", "45")] == [90, 1800, 7200, 5400, 45]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_step_saves_and_exits(tmp_path, signum):
    flow = write_flow(tmp_path / "tiny.flow", steps=100000, eval_every=100000)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "flowspec", "train", str(flow), "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()  # "training tiny ..." once the loop is about to start
    assert "training tiny" in line, line + proc.stderr.read()
    time.sleep(1.5)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)  # a watchdog: finishing the step takes well under 1 s
    assert proc.returncode == 128 + signum, stderr
    assert f"{signal.Signals(signum).name}: stopped after step" in stdout and "Traceback" not in stderr
    payload = load_checkpoint(out / LAST)
    assert payload["step"] > 0
    assert all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point())
    assert f"flowspec train --resume {out}" in stdout
    assert f"{signal.Signals(signum).name}: finishing the step or evaluation batch in progress" in stderr


def test_a_quiet_run_still_says_that_a_signal_stopped_it_and_how_to_go_on(tmp_path):
    flow = write_flow(tmp_path / "tiny.flow", steps=100000, eval_every=100000)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [
        sys.executable,
        "-m",
        "flowspec",
        "train",
        str(flow),
        "--out",
        str(out),
        "--device",
        "cpu",
        "-q",
        "--max-steps",  # the hint goes on to the same limit (an ablation's budget)
        "50000",
    ]
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    started = time.monotonic()
    while not (out / "spec.json").exists() and proc.poll() is None and time.monotonic() - started < 60:
        time.sleep(0.1)  # written as the loop starts
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and stdout == "", stderr
    assert "SIGINT: finishing the step" in stderr and "SIGINT: stopped after step" in stderr
    assert f"Continue with: flowspec train --resume {out} --max-steps 50000" in stderr
    assert load_checkpoint(out / LAST)["step"] > 0


def test_quickstart_spec_trains(tmp_path, capsys):
    quickstart = os.path.join(ROOT, "specs", "quickstart.flow")
    out = tmp_path / "q"
    assert run(["train", quickstart, "--out", str(out), "--device", "cpu", "--max-steps", "2"]) == 0
    assert "done (max-steps) at step 2" in (printed := capsys.readouterr().out)
    assert "(best.pt: " in printed and "this short run's evaluation)" in printed  # none scheduled yet
    assert (out / "samples" / "step0000002_t1.0.png").is_file()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_quiet_stop_line_comes_from_rank_0_only(tmp_path, monkeypatch, capsys, rank):
    from flowspec.errors import RunStopped
    from flowspec.train.trainer import RunResult

    stopped = RunResult(tmp_path, 7, 0.1, "SIGINT", None, None, 0.0, 10)

    def stopped_run(*args, **kwargs):
        raise RunStopped(stopped)

    monkeypatch.setattr(flowspec, "train", stopped_run)
    monkeypatch.setenv("RANK", rank)
    assert run(["train", str(write_flow(tmp_path / "t.flow")), "-q"]) == 130
    said = capsys.readouterr().err
    assert ("SIGINT: stopped after step 7" in said) == (rank == "0")


@contextlib.contextmanager
def _stdout_nobody_reads(monkeypatch):
    """sys.stdout a pipe whose reader is gone (`| head -c 10` after its bytes)."""
    read, write = os.pipe()
    os.close(read)
    with open(write, "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        yield


def test_a_run_whose_stdout_reader_went_away_trains_on(tmp_path, monkeypatch, capsys):
    flow = write_flow(tmp_path / "tiny.flow", steps=6, eval_every=3)
    with _stdout_nobody_reads(monkeypatch):
        assert run(["train", str(flow), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 0
    assert load_checkpoint(tmp_path / "run")["step"] == 6 and capsys.readouterr().err == ""


def test_a_stop_line_goes_to_stderr_once_stdout_s_reader_went_away(tmp_path, monkeypatch, capsys):
    """`flowspec train ... | tee log`, and Ctrl-C to both: the line saying how to go on is still seen."""
    from flowspec.train.update import Updater

    step = Updater.__call__

    def step_then_signal(self, *args, **kwargs):
        done = step(self, *args, **kwargs)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return done

    monkeypatch.setattr(Updater, "__call__", step_then_signal)
    flow = write_flow(tmp_path / "tiny.flow", steps=6, eval_every=3)
    with _stdout_nobody_reads(monkeypatch):
        assert run(["train", str(flow), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 130
    said = capsys.readouterr().err
    assert said.count("SIGINT: stopped after step 2;") == 1
    assert f"Continue with: flowspec train --resume {tmp_path / 'run'}" in said
