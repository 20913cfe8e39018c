"""Tests from a mutation audit of the command-line layer (`flowspec/cli`, `flowspec/errors.py`): each fails
on a plausible bug of the glue between the options and what they drive that every other test passed. Most
replace the work a command drives with a stand-in that records what it was given, so none trains."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest
from train_helpers import write_flow

import flowspec
from flowspec.cli import language
from flowspec.cli.app import OUT_OF_MEMORY, run
from flowspec.train.trainer import RunResult

QUICKSTART = Path(__file__).resolve().parent.parent / "specs" / "quickstart.flow"


@pytest.fixture(autouse=True)
def _outside_torchrun(monkeypatch):
    """None of torchrun's variables from the environment the tests run in."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def _result(run_dir: Path, stopped: str = "finished", **changes) -> RunResult:
    """A `RunResult` as `flowspec.train` returns it, without training."""
    fields = dict(run_dir=run_dir, step=5, epoch=0.1, stopped=stopped, test_bpd=2.5, best_bpd=None)
    return RunResult(**(fields | dict(img_s=1.0, parameters=10) | changes))


@pytest.fixture
def given(monkeypatch, tmp_path):
    """`flowspec.train` replaced by a stand-in that records its keywords and returns `given["result"]`."""
    seen: dict = {"result": _result(tmp_path / "run")}

    def fake(spec, data, out, **kwargs):
        seen.update(kwargs, spec=spec, data=data, out=out)
        return seen["result"]

    monkeypatch.setattr(flowspec, "train", fake)
    return seen


def test_train_gives_each_option_to_the_parameter_of_its_name(tmp_path, given):
    """Every option of `train` reaches `flowspec.train` as itself, none as another's or as its default."""
    flow = write_flow(tmp_path / "tiny.flow")
    args = ["--precision", "bf16", "--recompute", "on", "--log-every", "7", "--quiet", "--data-memory", "1G"]
    args += ["--max-steps", "5", "--max-time", "30m", "--threads", "1", "--allow-large", "--compile"]
    args += ["--eval-images", "10", "--eval-batch", "4", "--eval-samples", "0", "--no-eval-inversion"]
    args += ["--tensorboard", "--device", "cpu", "--set", "train.lr=1e-3", "--data", str(tmp_path)]
    assert run(["train", str(flow), "--out", str(tmp_path / "r"), *args]) == 0
    assert given["precision"] == "bf16" and given["recompute"] == "on" and given["log_every"] == 7
    assert given["quiet"] is True and given["data_memory"] == "1G" and given["max_steps"] == 5
    assert given["max_time"] == "30m" and given["threads"] == 1 and given["allow_large"] is True
    assert given["compile"] is True and given["tensorboard"] is True and given["device"] == "cpu"
    assert given["eval"] == {"images": 10, "batch": 4, "samples": 0, "inversion": False}
    assert list(given["sets"]) == ["train.lr=1e-3"] and given["data"] == tmp_path
    assert given["out"] == tmp_path / "r" and given["spec"] == flow


def test_train_options_left_out_are_the_documented_defaults(tmp_path, given):
    flow = write_flow(tmp_path / "tiny.flow")
    assert run(["train", str(flow), "-q"]) == 0
    assert given["precision"] is None and given["recompute"] == "auto" and given["log_every"] is None
    assert given["eval"] == {} and given["compile"] is False and given["data_memory"] is None


def test_the_done_line_names_the_evaluation_best_pt_kept_and_quiet_drops_it(tmp_path, given, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "best.pt").write_bytes(b"")
    flow = write_flow(tmp_path / "tiny.flow")
    given["result"] = _result(run_dir, history=[{"step": 5}], best_bpd=2.25, best_scheduled=True)
    assert run(["train", str(flow)]) == 0
    out = capsys.readouterr().out
    assert "done (finished) at step 5: test 2.5000 bits/dim (best.pt: 2.2500, the best scheduled " in out
    given["result"] = _result(run_dir, history=[{"step": 5}], best_bpd=2.25, best_scheduled=False)
    assert run(["train", str(flow)]) == 0
    assert "(best.pt: 2.2500, this short run's evaluation)" in capsys.readouterr().out
    assert run(["train", str(flow), "--quiet"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(("name", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_run_a_signal_stopped_exits_with_its_signals_code_and_quiet_still_says_so(
    tmp_path, given, capsys, name, code
):
    flow = write_flow(tmp_path / "tiny.flow")
    given["result"] = _result(tmp_path / "run", stopped=name)
    assert run(["train", str(flow), "--quiet", "--max-steps", "9"]) == code
    err = capsys.readouterr().err
    assert err.startswith(f"{name}: stopped after step 5; saved {tmp_path / 'run' / 'last.pt'}")
    assert f"--resume {tmp_path / 'run'} --max-steps 9" in err


def test_a_quiet_stop_line_is_rank_0s_alone(tmp_path, given, capsys, monkeypatch):
    flow = write_flow(tmp_path / "tiny.flow")
    given["result"] = _result(tmp_path / "run", stopped="SIGTERM")
    monkeypatch.setenv("RANK", "1")
    assert run(["train", str(flow), "--quiet"]) == 143
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("signum", "code", "said"),
    [(signal.SIGINT, 130, "interrupted (Ctrl-C)"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
)
def test_a_signal_before_training_starts_exits_with_its_code_naming_it(
    tmp_path, monkeypatch, capsys, signum, code, said
):
    """Ctrl-C or SIGTERM while `train` prepares (before its loop saves anything) is one line naming the
    signal, what is kept and how to go on: exit 130 or 143."""

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(flowspec, "train", stopped)
    assert run(["train", str(write_flow(tmp_path / "tiny.flow"))]) == code
    err = capsys.readouterr().err
    assert err.startswith(f"error: {said}; checkpoints already written are kept") and err.count("\n") == 1


def _torch_out_of_memory() -> Exception:
    import torch

    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("error", [MemoryError, _torch_out_of_memory], ids=["MemoryError", "torch"])
def test_out_of_memory_is_a_user_error_with_a_hint_not_a_bug(monkeypatch, capsys, error):
    """Python's `MemoryError` and torch's `OutOfMemoryError` (a `RuntimeError`) alike."""

    def too_large(path, sets):
        raise error()

    monkeypatch.setattr(language, "load_cli_spec", too_large)
    assert run(["validate", str(QUICKSTART)]) == 2
    assert capsys.readouterr().err == f"error: {OUT_OF_MEMORY}\n"


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--set", "train.lr=1e-3"], "--set"),
        (["--seed", "3"], "--seed"),
        (["--steps", "4"], "--steps"),
        (["--precision", "bf16"], "--precision"),
        (["{flow}"], "specs"),
    ],
)
def test_ablate_resume_refuses_specs_and_settings_of_its_plan(tmp_path, capsys, extra, named):
    """`ablate --resume DIR` runs the plan's specs with the plan's settings: a spec or a setting beside it is
    refused before anything is read, naming it; how to run (--device, --threads, ...) is not."""
    flow = write_flow(tmp_path / "tiny.flow")
    args = [a.format(flow=flow) for a in extra]
    assert run(["ablate", "--resume", str(tmp_path / "ab"), *args]) == 2
    err = capsys.readouterr().err
    assert "finishes the ablation with its own specs and settings" in err and f"leave out the {named}" in err
    assert run(["ablate", "--resume", str(tmp_path / "ab"), "--threads", "1", "--device", "cpu", "-q"]) == 2
    assert "leave out" not in capsys.readouterr().err  # refused for the plan it lacks instead


@pytest.fixture
def ablated(monkeypatch):
    """`run_ablation` replaced by a stand-in that records what it was given and returns `ablated["done"]`."""
    from flowspec.train import ablate

    seen: dict = {"done": ablate.Ablation()}

    def fake(specs, options, out, seed, stop, overrides, budget):
        seen.update(specs=specs, options=options, out=out, seed=seed, overrides=overrides, budget=budget)
        return seen["done"]

    monkeypatch.setattr(ablate, "run_ablation", fake)
    return seen


def test_ablate_gives_each_option_to_the_runs_and_its_seed_to_every_spec(tmp_path, ablated):
    flow = write_flow(tmp_path / "tiny.flow")
    args = ["--steps", "3", "--precision", "bf16", "--recompute", "on", "--compile", "--data-memory", "1G"]
    args += ["--eval-images", "10", "--threads", "1", "--device", "cpu", "-q", "--out", str(tmp_path / "ab")]
    assert run(["ablate", str(flow), *args, "--seed", "7", "--data", str(tmp_path)]) == 0
    options = ablated["options"]
    assert (options.precision, options.recompute, options.compile) == ("bf16", "on", True)
    assert (options.max_steps, options.max_run_time, options.data_memory) == (3, None, 2**30)
    assert (options.threads, options.device, options.quiet, options.data_dir) == (1, "cpu", True, tmp_path)
    assert options.eval["images"] == 10 and ablated["seed"] == 7 and ablated["out"] == tmp_path / "ab"
    assert run(["ablate", str(flow), "--budget", "2m", "-q", "--out", str(tmp_path / "ab2")]) == 0
    options = ablated["options"]
    assert (options.max_steps, options.max_run_time, ablated["seed"]) == (None, 120, 0)  # seed 0 by default
    assert (options.precision, options.recompute, options.compile) == (None, "auto", False)


@pytest.mark.parametrize(("name", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_ablation_a_signal_stopped_exits_with_its_code_and_a_failed_run_with_2(
    tmp_path, ablated, capsys, name, code
):
    from flowspec.train.ablate import Ablation

    flow = write_flow(tmp_path / "tiny.flow")
    out = tmp_path / "ab"
    ablated["done"] = Ablation(runs=[_result(out / "tiny", stopped=name)])
    assert run(["ablate", str(flow), "--steps", "3", "-q", "--out", str(out)]) == code
    assert f"{name}: the ablation stopped in the run of tiny (step 5); 0 of 1 runs" in capsys.readouterr().err
    ablated["done"] = Ablation(failed=[("tiny", "a full disk")])
    assert run(["ablate", str(flow), "--steps", "3", "-q", "--out", str(out)]) == 2
    assert "error: the run of tiny failed: a full disk" in capsys.readouterr().err


def test_the_ablation_table_is_titled_by_its_budget_and_seed(tmp_path, ablated, capsys, monkeypatch):
    from flowspec.train.ablate import Ablation

    monkeypatch.setenv("COLUMNS", "120")
    flow = write_flow(tmp_path / "tiny.flow")
    out = tmp_path / "ab"
    ablated["done"] = Ablation(runs=[_result(out / "tiny", stopped="max-steps")])
    assert run(["ablate", str(flow), "--steps", "3", "--seed", "7", "-q", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ablation (3 steps each, seed 7)" in printed and f"runs and curves in {out}" in printed


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of two steps."""
    from train_helpers import tiny_spec

    from flowspec.train.trainer import RunOptions, train

    out = tmp_path_factory.mktemp("cli_mutants") / "run"
    train(tiny_spec(steps=2), RunOptions(out=out, device="cpu", quiet=True))
    return out


def test_the_header_line_of_sample_and_eval_names_the_device_threads_and_precision(trained, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    args = ["-n", "4", "--seed", "1", "--device", "cpu", "--threads", "1", "--out", str(grid)]
    assert run(["sample", str(trained), *args]) == 0
    out = capsys.readouterr().out
    header = "tiny, step 2, device cpu, threads 1 (--threads), precision fp32 (the run's)"
    assert out.splitlines()[0] == header
    assert f"wrote 4 samples of tiny (step 2, T=1.0, seed 1) to {grid}" in out
    args = ["--images", "8", "--device", "cpu", "--out", str(tmp_path / "e.json")]
    assert run(["eval", str(trained), *args]) == 0
    assert capsys.readouterr().out.startswith("tiny, step 2, device cpu, threads ")


def test_sample_draws_64_by_default_and_takes_temperature_0(trained, tmp_path, capsys):
    """The documented default count, and T=0 (the prior's mode: `a finite number >= 0`)."""
    assert run(["sample", str(trained), "--seed", "2", "-t", "0", "--out", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert f"wrote 64 samples of tiny (step 2, T=0.0, seed 2) to {tmp_path / 'g.png'}" in out
    assert run(["sample", str(trained), "-t", "-0.5"]) == 2
    assert "--temperature must be a finite number >= 0, got -0.5" in capsys.readouterr().err


def test_cache_all_of_only_caches_in_use_frees_nothing_without_calling_them_unneeded(
    tmp_path, monkeypatch, capsys
):
    """Every chosen cache kept (in use): `freed 0 B`, not `nothing to remove` (which says none was chosen)."""
    from test_cache_command import prepare

    from flowspec.spec import DataSpec
    from flowspec.train import datacache
    from flowspec.train.data import load_split

    monkeypatch.setenv("FLOWSPEC_CACHE_DIR", str(tmp_path / "cache"))
    read = prepare(tmp_path / "read")
    load_split(DataSpec(dataset="folder", path=str(tmp_path / "read"), shape=(3, 12, 12)), "train")
    try:
        assert run(["cache", "--all"]) == 0
    finally:
        datacache.release_reads()
    out = capsys.readouterr().out
    assert f"kept {read}: in use" in out and out.endswith("freed 0 B\n") and "nothing to remove" not in out
    assert read.is_dir()


def test_show_refuses_what_validate_refuses(tmp_path, capsys):
    """A spec that unrolls to more steps than flowspec builds is not shown as if it were a spec."""
    path = tmp_path / "bomb.flow"
    body = "repeat 1000 { repeat 1000 { repeat 1000 { flip } } }"
    data = "data digits { shape 1x8x8 levels 17 }"
    path.write_text(f"model bomb\n{data}\nflow {{ split stripe {{ {body} }} }}\n")
    assert run(["show", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}:3:23: the spec unrolls to 1,000,000,001 steps")


def test_an_os_error_message_says_what_its_caller_was_doing():
    """`doing` given wins over what `naming` recorded, which wins over `accessing`."""
    import errno

    from flowspec.errors import named_error, os_error_message

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/e.json")
    assert os_error_message(full) == "no space left accessing /runs/x/e.json"
    assert os_error_message(full, "writing") == "no space left writing /runs/x/e.json"
    read = named_error(full, "/runs/x/e.json", "reading")
    assert os_error_message(read) == "no space left reading /runs/x/e.json"
    assert os_error_message(read, "writing") == "no space left writing /runs/x/e.json"


def test_an_os_error_on_no_path_is_a_bug_not_the_users(monkeypatch, capsys):
    """Only an OS error on a path (a full disk, a read-only folder) is the user's to fix."""

    def broken(path, sets):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(language, "load_cli_spec", broken)
    assert run(["validate", str(QUICKSTART)]) == 1
    err = capsys.readouterr().err
    assert "OSError: [Errno 9] Bad file descriptor" in err
    assert err.rstrip().splitlines()[-1].startswith("this is a bug in flowspec")


def test_an_eof_error_is_a_bug_not_a_ctrl_c(monkeypatch, capsys):
    """typer turns an `EOFError` (`np.load` of an empty file) into its `Abort`, which was reported as
    Ctrl-C: exit 130, no traceback."""

    def short(path, sets):
        raise EOFError("No data left in file")

    monkeypatch.setattr(language, "load_cli_spec", short)
    assert run(["validate", str(QUICKSTART)]) == 1
    err = capsys.readouterr().err
    assert "EOFError: No data left in file" in err and "Ctrl-C" not in err
    assert err.rstrip().splitlines()[-1].startswith("this is a bug in flowspec")


def test_a_second_ctrl_c_stops_sample_at_once_with_exit_130(monkeypatch, capfd):
    """The first Ctrl-C asks sample to stop after its batch; a second one stops it at once."""
    from flowspec.cli import inference

    def loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(inference, "_load_for_inference", loading)
    assert run(["sample", "run"]) == 130
    assert capfd.readouterr().err.endswith("\ninterrupted: sampling stopped; nothing was written\n")


def test_threads_0_is_refused_as_a_bad_option_before_anything_is_read(tmp_path, capsys):
    assert run(["sample", str(tmp_path / "missing"), "--threads", "0"]) == 2
    assert "Invalid value for '--threads'" in capsys.readouterr().err


def test_an_output_file_type_in_capitals_is_taken(trained, tmp_path):
    """`grid.PNG` is a PNG file (Pillow reads the type in either case)."""
    assert run(["sample", str(trained), "-n", "4", "--out", str(tmp_path / "grid.PNG")]) == 0
    assert (tmp_path / "grid.PNG").read_bytes().startswith(b"\x89PNG")


def test_diff_like_the_other_language_tools_prints_on_rank_0_alone(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run(["diff", str(QUICKSTART), "--set", "train.lr=1e-3"]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert run(["diff", str(QUICKSTART), "--set", "train.lr=1e-3"]) == 0
    assert "lr" in capsys.readouterr().out


def test_inspect_probes_8_images_without_batch(tmp_path, capsys):
    """The documented default of `inspect --probe` (`--batch`: default 8)."""
    import json

    assert run(["inspect", str(write_flow(tmp_path / "tiny.flow")), "--probe", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["probe"]["batch"] == 8


def test_the_api_refuses_a_number_for_a_switch(tmp_path):
    """`quiet=1` is not `quiet=True`: refused before the spec is read."""
    from flowspec.errors import UserError

    with pytest.raises(UserError, match="quiet must be True or False, got 1"):
        flowspec.train(tmp_path / "missing.flow", quiet=1)


def test_naming_keeps_what_an_inner_naming_said_was_being_done():
    """A read failing inside a write says `reading` the file read, not `writing` it."""
    from flowspec.errors import naming, os_error_message

    with pytest.raises(OSError) as caught, naming("/runs/x/e.json", "writing"):
        with naming("/runs/x/last.pt", "reading"):
            raise OSError(errno.EACCES, "Permission denied")
    assert os_error_message(caught.value) == "permission denied reading /runs/x/last.pt"


def test_train_refuses_eval_inversion_with_no_eval_inversion(tmp_path, given, capsys):
    flow = write_flow(tmp_path / "tiny.flow")
    assert run(["train", str(flow), "--eval-inversion", "--no-eval-inversion"]) == 2
    assert "--eval-inversion and --no-eval-inversion contradict each other" in capsys.readouterr().err


def test_a_world_size_of_0_is_refused_and_a_rank_of_0_taken(monkeypatch):
    from flowspec.errors import UserError, job_number

    monkeypatch.setenv("WORLD_SIZE", "0")
    with pytest.raises(UserError, match=r"WORLD_SIZE='0' is not a whole number >= 1"):
        job_number("WORLD_SIZE", 1)
    monkeypatch.setenv("RANK", "0")
    assert job_number("RANK", 5) == 0
