"""torchrun jobs: two processes on CPU with the gloo backend, and one process (gloo on CPU, NCCL on CUDA)
that trains and resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from train_helpers import tiny_spec, write_flow, write_shards

from flowspec.errors import PEER_STOPPED
from flowspec.train.checkpoint import load_checkpoint
from flowspec.train.metrics import is_eval, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(tmp_path, **extra: str) -> dict[str, str]:
    """A torchrun job's environment: one thread, and a temporary folder in `tmp_path` (torchrun's
    torchelastic_* and torch's torchinductor_* folders were left in the system's)."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path / "tmp"), **extra)


def test_two_gloo_processes_train_and_only_rank_0_writes(tmp_path):
    """Each process accumulates two micro-batches of 4 (DDP all-reduces after the second), and they agree
    on stopping at every step (--log-every 1). The gated network (the official ImageNet and CelebA
    dequantizer's) holds a position embedding that gets no gradient: DDP must be told."""
    flow = write_flow(tmp_path / "tiny.flow", steps=4, eval_every=2)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "flowspec", "train", str(flow), "--out", str(out), "--device", "cpu",
        "--set", "train.accumulate=2", "--set", "defaults.coupling.network=gated", "--log-every", "1",
    ]  # fmt: skip
    env = _env(tmp_path)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("training tiny") == 1  # rank 1 prints nothing
    assert "2 processes (torchrun, gloo)" in done.stdout
    payload = load_checkpoint(out)
    assert payload["step"] == 4 and len(payload["rng"]) == 2  # both ranks' RNG states, for resume
    assert not torch.equal(payload["rng"][0]["torch"], payload["rng"][1]["torch"])  # per-rank noise
    rows = [r for r in read_metrics(out) if is_eval(r)]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["skipped"] == 0 and r["test_bpd"] < 4.5 for r in rows)
    # 2 processes x 8 images = the spec's global batch of 16: 4 steps cover 64 of 1,500 images
    assert abs(payload["epoch"] - 4 * 16 / (1500 // 16 * 16)) < 1e-6
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock", "best.pt", "curves.png", "last.pt", "metrics.jsonl", "samples", "spec.flow", "spec.json",
    ]  # fmt: skip


def test_a_signal_to_torchrun_stops_both_ranks_within_a_step_and_saves(tmp_path):
    """torchrun forwards a Ctrl-C to its workers and kills them 30 s later: the ranks agree to stop through
    each step's all-reduce, not at the next logging step (never, at --log-every 100000)."""
    flow = write_flow(tmp_path / "tiny.flow", steps=100_000, eval_every=100_000)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "flowspec", "train", str(flow), "--out", str(out), "--device", "cpu", "--log-every", "100000",
    ]  # fmt: skip
    env = _env(tmp_path)
    job = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists():  # written after the first step
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.2)
        time.sleep(1.0)
        job.send_signal(signal.SIGINT)
        stdout, stderr = job.communicate(timeout=120)  # a watchdog: the ranks' own stop is checked below
    finally:
        try:  # its workers run in sessions of their own: torchrun must live to kill them
            job.wait(timeout=60)
        except subprocess.TimeoutExpired:
            job.kill()
    assert "SIGINT: stopped after step" in stdout, stdout + stderr
    assert "SIGKILL" not in stderr and "Signal 9" not in stderr, stderr  # not torchrun's kill 30 s later
    assert load_checkpoint(out)["step"] > 1


CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize(("device", "backend"), [("cpu", "gloo"), pytest.param("cuda", "nccl", marks=CUDA)])
def test_one_torchrun_process_joins_a_group_trains_and_resumes(tmp_path, device, backend):
    """A job of one process still joins the process group (NCCL on the GPU) and trains through DDP;
    precision auto (bf16 where the hardware has it); stopped at step 2, resumed to step 4."""
    flow = write_flow(tmp_path / "tiny.flow", steps=4, eval_every=2)
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    train = ["-m", "flowspec", "train", "--device", device, "--precision", "auto", "--max-steps"]
    env = _env(tmp_path)
    for steps, extra in ((2, [str(flow), "--out", str(out)]), (4, ["--resume", str(out)])):
        command = [*launch, *train, str(steps), *extra]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"1 process (torchrun, {backend})" in done.stdout and "precision " in done.stdout
        assert f"device {device}" in done.stdout
        assert load_checkpoint(out)["step"] == steps
    assert [r["step"] for r in read_metrics(out) if is_eval(r)] == [2, 4]


def test_ranks_leave_the_group_together_after_a_finished_run_and_at_once_after_a_failure(monkeypatch):
    """A finished run's ranks meet at a barrier before tearing down (one leaving while rank 0 still wrote
    its final files aborted at exit about one job in ten); a failed one tears down at once (its peers
    may never reach a barrier)."""
    from flowspec.train import distributed, trainer

    calls = []
    monkeypatch.setattr(distributed.td, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.td, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.td, "destroy_process_group", lambda: calls.append("destroy"))

    class Finishing:
        def __init__(self, *args, **kwargs):
            pass

        def run(self):
            return "result"

    class Failing(Finishing):
        def run(self):
            raise RuntimeError("rank failed")

    monkeypatch.setattr(trainer, "Trainer", Finishing)
    assert trainer.train(None, None) == "result"
    assert calls == ["barrier", "destroy"]
    calls.clear()
    monkeypatch.setattr(trainer, "Trainer", Failing)
    with pytest.raises(RuntimeError, match="rank failed"):
        trainer.train(None, None)
    assert calls == ["destroy"]


def test_leaving_the_group_frees_the_ddp_wrappers_that_hold_it(tmp_path):
    """A DistributedDataParallel wrapper lives on in reference cycles after its run, holding the process
    group: teardown collects it, so that the group goes with destroy_process_group and not at the
    interpreter's exit (an ablation job's rank 1 aborted there once: "terminate called without an active
    exception")."""
    import gc
    import weakref
    from types import SimpleNamespace

    from flowspec.train.distributed import teardown

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        run = SimpleNamespace(wrapper=torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2)))
        run.itself = run  # a finished run's state in a reference cycle, as the trainer's was
        gc.collect()
        gc.disable()  # no collection but teardown's
        alive = weakref.ref(run.wrapper)
        del run
        assert alive() is not None
        teardown(together=True)
        assert alive() is None and not torch.distributed.is_initialized()
    finally:
        gc.enable()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_under_torchrun_the_commands_that_go_on_start_as_many_processes(tmp_path, monkeypatch):
    """`Continue with: flowspec train --resume RUN` resumed a job of 2 processes in one: not exact."""
    from flowspec.train import ablate
    from flowspec.train.trainer import resume_command

    run_dir = tmp_path / "run"
    for name, value in (("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    torchrun = "torchrun --nproc_per_node 2 -m flowspec"
    assert resume_command(run_dir, 300) == f"{torchrun} train --resume {run_dir} --max-steps 300"
    assert ablate.resume_command(run_dir) == f"{torchrun} ablate --resume {run_dir}"
    for name, value in (("WORLD_SIZE", "16"), ("LOCAL_WORLD_SIZE", "8"), ("GROUP_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)  # two machines
    assert resume_command(run_dir, None) == (
        f"torchrun --nnodes 2 --nproc_per_node 8 -m flowspec train --resume {run_dir} (on every node, "
        "with the job's rendezvous options)"
    )


def test_a_run_resumed_by_another_number_of_processes_says_so_in_its_header(tmp_path, capsys):
    from flowspec.train.checkpoint import save_atomic
    from flowspec.train.trainer import RunOptions, train

    run_dir = tmp_path / "run"
    options = RunOptions(out=run_dir, device="cpu", max_steps=2, eval={"images": 16, "samples": 0})
    train(tiny_spec(steps=4), options)
    assert "1 process;" in capsys.readouterr().out
    payload = load_checkpoint(run_dir)
    save_atomic({**payload, "rng": payload["rng"] * 2}, run_dir / "last.pt")  # as 2 processes write it
    train(tiny_spec(steps=4), replace(options, resume=True, max_steps=3))
    assert (
        "1 process (the checkpoint of step 2 was written by 2 processes: the data position carries over, "
        "the per-process randomness is reseeded); run folder"
    ) in capsys.readouterr().out


def test_the_device_string_picks_the_device_or_is_refused(monkeypatch):
    """`cuda:N` trains on GPU N (it trained on the CPU without a word); other names are refused."""
    from flowspec.errors import UserError
    from flowspec.train.distributed import setup

    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert setup("cpu")[1] == torch.device("cpu")
    for device, message in (("mps", "trains on cpu or cuda"), ("gpu", "not one torch knows")):
        with pytest.raises(UserError, match=message):
            setup(device)
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device is available"):
        setup("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert setup("cuda:1")[1] == torch.device("cuda", 1) and setup("cuda")[1] == torch.device("cuda", 0)
    assert chosen == [1, 0]
    with pytest.raises(UserError, match=r"CUDA device 2 does not exist \(this machine has 2"):
        setup("cuda:2")
    from flowspec.devices import device_memory  # the memory check, which comes first

    with pytest.raises(UserError, match=r"CUDA device 2 does not exist \(this machine has 2"):
        device_memory("cuda:2")


def test_an_ablation_under_torchrun_runs_every_spec_in_one_job_and_rank_0_reports(tmp_path):
    """The job's process group serves every run (it was left after the first), and only rank 0 prints the
    table and writes ablation.json (rank 1, which reads no metrics, overwrote it with empty rows)."""
    specs = [str(write_flow(tmp_path / f"{name}.flow", name=name)) for name in ("a", "b")]
    out = tmp_path / "ablation"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "flowspec", "ablate", *specs, "--steps", "2", "--out", str(out), "--device", "cpu", "-q",
        "--eval-samples", "0",
    ]  # fmt: skip
    env = _env(tmp_path)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ablation (2 steps each, seed 0)") == 1
    rows = json.loads((out / "ablation.json").read_text())
    assert [r["spec"] for r in rows] == ["a", "b"] and all(r["test bits/dim"] > 0 for r in rows)
    again = [*command[:8], "ablate", "--resume", str(out), "-q"]  # finished: the same table, once
    done = subprocess.run(again, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.count("ablation (2 steps each, seed 0)") == 1, done.stderr
    assert json.loads((out / "ablation.json").read_text()) == rows


def _per_rank_job(tmp_path, args: list[str]) -> subprocess.CompletedProcess:
    """`torchrun` with two processes of `flowspec ARGS`, each in its own folder `tmp_path/rN`; every process
    must end by itself with exit code 2, not be killed by torchrun's SIGKILL 30 s after its SIGTERM (a
    process waiting to join the job's group is deaf to it), nor abort at exit (one that left the job's
    group to the interpreter's exit did so now and then). The timeout is only a watchdog."""
    wrapper = tmp_path / "perrank.sh"
    wrapper.write_text(f'#!/bin/sh\ncd {tmp_path}/r$RANK && exec {sys.executable} -m flowspec "$@"\n')
    wrapper.chmod(0o755)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = _env(tmp_path, PYTHONPATH=ROOT)
    done = subprocess.run(
        [*launch, "--no-python", str(wrapper), *args], env=env, capture_output=True, text=True, timeout=120
    )
    codes = re.findall(r"exitcode  : (-?\d+)", done.stderr)  # torchrun's report of each failed process
    assert codes == ["2", "2"], done.stderr
    assert "SIGKILL" not in done.stderr and "Signal 9" not in done.stderr, done.stderr
    return done


@pytest.mark.parametrize(
    ("command", "missing"), [("train", "spec file a.flow not found"), ("ablate", "a.flow: data folder")]
)
def test_a_mistake_only_one_torchrun_process_meets_in_set_up_stops_every_process_at_once(
    tmp_path, command, missing
):
    """Rank 1 lacks its copy of the spec or the data (each rank reads from its own folder): it says so,
    rank 0 says that another process stopped, and both exit 2 at once (rank 0 waited to join the job's
    group, deaf to torchrun's SIGTERM, until killed 30 s later); an ablation leaves no plan or lock."""
    for rank in (0, 1) if command == "ablate" else (0,):
        flow = (tmp_path / f"r{rank}").mkdir() or write_flow(tmp_path / f"r{rank}" / "a.flow", name="a")
        flow.write_text(flow.read_text().replace("data digits {", "data npz {"))
    (tmp_path / "r1").mkdir(exist_ok=True)
    write_shards(tmp_path / "r0" / "shards")
    out = tmp_path / "out"
    budget = ["--max-steps", "2"] if command == "train" else ["--steps", "2"]
    done = _per_rank_job(
        tmp_path, [command, "a.flow", *budget, "--data", "shards", "--out", str(out), "--device", "cpu", "-q"]
    )
    assert f"error (rank 1): {missing}" in done.stderr, done.stderr
    assert f"error: {PEER_STOPPED}" in done.stderr
    assert not out.exists()  # no run folder, plan or lock: the same command may run again


@pytest.mark.parametrize("command", ["train RUN_DIR", "ablate --resume"])
def test_a_run_folder_or_ablation_plan_only_one_torchrun_process_refuses_stops_every_process_at_once(
    tmp_path, command
):
    """Rank 1's a.flow is a run folder (refused: `train --resume` continues it), or its copy of the
    ablation's plan is damaged: it says so and rank 0 that another process stopped. Both were refused
    before joining the job: rank 0 was killed by torchrun's SIGTERM (exit 143, no reason given), or waited
    in the group until killed 30 s later."""
    for rank in (0, 1):
        (tmp_path / f"r{rank}").mkdir()
    if command == "train RUN_DIR":
        write_flow(tmp_path / "r0" / "a.flow", name="a")
        for name in ("spec.flow", "spec.json", "metrics.jsonl"):  # a run folder, as `train SPEC` sees one
            (tmp_path / "r1" / "a.flow").mkdir(exist_ok=True)
            (tmp_path / "r1" / "a.flow" / name).write_text("")
        args, refused = ["train", "a.flow", "--max-steps", "2"], "a.flow is a run folder, not a spec file"
    else:
        from flowspec.train.ablation_plan import PLAN, Plan
        from flowspec.train.trainer import RunOptions

        plan = Plan.make([tiny_spec(name="a")], ["a"], [None], RunOptions(max_steps=2), "2 steps", [])
        plan.write(tmp_path / "r0" / "abl")
        (tmp_path / "r1" / "abl").mkdir()
        (tmp_path / "r1" / "abl" / PLAN).write_text("{}")
        args, refused = ["ablate", "--resume", "abl"], f"abl/{PLAN} is damaged"
    done = _per_rank_job(tmp_path, [*args, "--device", "cpu", "-q"])
    assert f"error (rank 1): {refused}" in done.stderr, done.stderr
    assert f"error: {PEER_STOPPED}" in done.stderr


@pytest.mark.parametrize("command", ["validate", "show", "inspect", "diff"])
def test_under_torchrun_the_language_tools_print_on_rank_0_alone(tmp_path, monkeypatch, capsys, command):
    """The other processes of the job print nothing (each printed it all again), but still check their own
    copy of the spec: a machine whose copy is missing says so and fails."""
    from flowspec.cli.app import run

    flow = write_flow(tmp_path / "a.flow", name="a")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert run([command, str(flow)]) == 0
        assert bool(capsys.readouterr().out) is printed
    monkeypatch.setenv("RANK", "1")
    assert run([command, str(tmp_path / "missing.flow")]) == 2
    assert "missing.flow" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")  # a RANK left in a shell, no job: the tool prints
    assert run([command, str(flow)]) == 0
    assert capsys.readouterr().out


def test_a_torchrun_variable_that_is_not_a_number_is_named(tmp_path, monkeypatch, capsys):
    """An empty WORLD_SIZE (`export WORLD_SIZE=$SLURM_NTASKS` outside Slurm) is unset; another value stops
    the commands that read it with a message naming it, and leaves the language tools alone."""
    from flowspec.cli.app import run

    flow = write_flow(tmp_path / "a.flow", name="a")
    monkeypatch.setenv("WORLD_SIZE", "")
    assert run(["validate", str(flow)]) == 0
    monkeypatch.setenv("WORLD_SIZE", "x")
    assert run(["validate", str(flow)]) == 0
    capsys.readouterr()
    assert run(["train", str(flow), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE='x' is not a whole number >= 1" in err and "Traceback" not in err
    monkeypatch.setenv("WORLD_SIZE", "0")  # divided the batch by zero
    assert run(["train", str(flow), "--out", str(tmp_path / "run")]) == 2
    assert "WORLD_SIZE='0' is not a whole number >= 1" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")  # left in a shell: torch's ValueError was reported as a bug
    assert run(["train", str(flow), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "the environment has LOCAL_RANK but not RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT" in err
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("RANK", "1")  # trained on empty batches (a rank past the only process's share)
    assert run(["train", str(flow), "--out", str(tmp_path / "run")]) == 2
    assert "the environment has RANK but not WORLD_SIZE, LOCAL_RANK" in capsys.readouterr().err
    for name, value in {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RANK", "2")
    assert run(["train", str(flow), "--out", str(tmp_path / "run")]) == 2
    assert "RANK=2 in a job of WORLD_SIZE=2 processes (ranks 0 to 1)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_rank_0_of_an_ablation_whose_last_run_failed_writes_its_comparison_before_the_others_exit(tmp_path):
    """Every rank records the failed run and exits 2 after the ablation; torchrun ends the others as soon
        as one exits with an error, so rank 0 was stopped by its SIGTERM (exit 143, or -15 as it exited) while
    it printed the table."""
    specs = [str(write_flow(tmp_path / f"{name}.flow", name=name)) for name in ("a", "b")]
    script = tmp_path / "failing_b.py"
    script.write_text(
        "import time\n"
        "from flowspec.cli import main\n"
        "from flowspec.errors import UserError\n"
        "from flowspec.cli import training\n"
        "from flowspec.train import trainer\n"
        "run, table = trainer.Trainer.run, training._print_ablation\n"
        "def failing(self):\n"
        "    if self.spec.name == 'b':\n"
        "        raise UserError('b diverged')\n"
        "    return run(self)\n"
        "def slow(*args):\n"
        "    time.sleep(2)  # a slow terminal\n"
        "    table(*args)\n"
        "trainer.Trainer.run, training._print_ablation = failing, slow\n"
        "main()\n"
    )
    out = tmp_path / "ablation"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
        "ablate", *specs, "--steps", "2", "--out", str(out), "--device", "cpu", "--threads", "1", "-q",
        "--eval-samples", "0",
    ]  # fmt: skip
    env = _env(tmp_path, PYTHONPATH=ROOT)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "error: the run of b failed: b diverged" in done.stderr, done.stdout + done.stderr
    assert "(SIGTERM)" not in done.stderr and done.stderr.count("exitcode  : 2") == 2, done.stderr
    rows = json.loads((out / "ablation.json").read_text())
    assert [r["spec"] for r in rows] == ["a", "b"] and "ablation (2 steps each, seed 0)" in done.stdout
