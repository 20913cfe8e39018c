"""Hostile input: every mistake a user can make ends in one clear message and exit 2, never a traceback.

One test per class of input (the error boundary, spec text, values that validate but break later,
resource bombs, checkpoints, output paths and options); the fuzz tests are in test_fuzz.py.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from flowspec import load_spec, parse_spec
from flowspec.cli import language
from flowspec.cli.app import run
from flowspec.diagnostics import SpecError
from flowspec.loader import MAX_SPEC_BYTES, SpecFileError, read_spec_file
from flowspec.parser import MAX_DIGITS

QUICKSTART = Path(__file__).parent.parent / "specs" / "quickstart.flow"
TINY = (
    "model tiny\ndata digits { shape 1x8x8 levels 17 }\n"
    "flow { split stripe { coupling(filters=8, blocks=1, heads=2, components=2); flip } }\n"
)


def error_of(text: str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec(text, source="bad.flow", overrides=overrides)
    return str(caught.value)


# ---------------------------------------------------------------- the boundary


def test_an_internal_error_keeps_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    def broken(path, sets):
        raise ValueError("a flowspec bug")

    monkeypatch.setattr(language, "load_cli_spec", broken)
    assert run(["validate", str(QUICKSTART)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: a flowspec bug" in err
    assert err.rstrip().splitlines()[-1].startswith("this is a bug in flowspec 0.1.0")


def test_a_process_whose_torchrun_peer_stopped_says_so_instead_of_reporting_a_bug(monkeypatch, capsys):
    """Rank 1 met a user's error (a full disk) and stopped; rank 0's next collective fails."""

    def peer_gone(path, sets):
        raise RuntimeError("[gloo/gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer")

    monkeypatch.setattr(language, "load_cli_spec", peer_gone)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")  # validate runs on rank 0 alone
    assert run(["validate", str(QUICKSTART)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: another process of this torchrun job stopped, so this one cannot")
    assert "Traceback" not in err and "Connection reset by peer" in err
    monkeypatch.setenv("WORLD_SIZE", "1")  # alone, the same error is a bug
    assert run(["validate", str(QUICKSTART)]) == 1


@pytest.mark.parametrize(
    ("signum", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_a_signal_during_a_command_exits_130_or_143_with_one_line(monkeypatch, capsys, signum, code, word):
    def interrupted(path, sets):
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(language, "load_cli_spec", interrupted)
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]  # SIG_IGN under nohup
    assert run(["validate", str(QUICKSTART)]) == code
    err = capsys.readouterr().err
    assert err.startswith(f"error: {word} (") and err.count("\n") == 1 and "Traceback" not in err
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before  # handlers are restored


def test_an_os_error_on_a_path_is_a_user_error(monkeypatch, capsys):
    def full(path, sets):
        raise OSError(28, "No space left on device", "/runs/x/metrics.jsonl")

    monkeypatch.setattr(language, "load_cli_spec", full)
    assert run(["validate", str(QUICKSTART)]) == 2
    assert capsys.readouterr().err == "error: no space left accessing /runs/x/metrics.jsonl\n"


# ---------------------------------------------------------------- spec text


def test_deeply_nested_brackets_are_refused_where_they_pass_the_limit():
    deep = "(" * 500 + "1" + ")" * 500
    message = error_of(TINY + f"train {{ optimizer adam(betas={deep}) }}\n")
    assert message.startswith("bad.flow:4:92: brackets nested more than 64 deep")
    blocks = "flow { " + "repeat 1 { " * 400 + "flip" + " }" * 400 + " }"
    assert "brackets nested more than 64 deep" in error_of("model deep\n" + blocks)
    assert "--set:1:77: brackets nested more than 64 deep" in error_of(TINY, (f"train.betas={deep}",))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("9" * 5000, "a number with 5,000 digits: at most 64"),
        ("1" + "_0" * 100, "a number with 101 digits: at most 64"),
        ("1" + "0" * MAX_DIGITS, "a number with 65 digits: at most 64"),
        ("1e400", "the number 1e400 is too large"),
        ("3x" + "9" * 5000 + "x8", "a number with 5,000 digits: at most 64"),
    ],
)
def test_numbers_too_long_or_too_large_are_refused(value, message):
    assert error_of(TINY + f"train {{ seed {value} }}\n").startswith(f"bad.flow:4:14: {message}")
    assert error_of(TINY, (f"train.seed={value}",)).startswith(f"--set:1:12: {message}")


def test_a_number_of_64_digits_is_read():
    """The limit itself is allowed: 64 digits (leading zeros count) in a file and in --set."""
    seven = "0" * (MAX_DIGITS - 1) + "7"
    assert parse_spec(TINY + f"train {{ seed {seven} }}\n").train.seed == 7
    assert parse_spec(TINY, overrides=(f"train.seed={seven}",)).train.seed == 7


def test_a_long_line_shows_a_window_around_the_column():
    message = error_of(TINY + "train { seed " + "9" * 5000 + " }\n")
    assert max(len(line) for line in message.splitlines()) < 120


def test_a_set_key_with_a_huge_step_index_is_a_located_error():
    message = error_of(TINY, ("flow." + "9" * 5000 + ".mask=stripe",))
    assert message.startswith("--set:1:6: flow has steps 0 to 0, no step '999")


@contextmanager
def not_waiting_on(path: Path, seconds: float = 10):
    """Fail, instead of hanging, when reading the FIFO `path` waits for a writer: after `seconds` the FIFO
    is opened here for reading and writing, which lets the waiting open go on. Nothing for other paths."""
    released = threading.Event()

    def release():
        released.set()
        os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))  # on Linux, never waits itself

    timer = threading.Timer(seconds, release) if Path(path).is_fifo() else None
    if timer is not None:
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
            timer.join()
    assert not released.is_set(), f"reading the FIFO {path} waited for a writer ({seconds} s)"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda tmp: Path("/dev/zero"), "is a device, FIFO or socket, not a spec file"),
        (lambda tmp: (os.mkfifo(tmp / "fifo.flow"), tmp / "fifo.flow")[1], "is a device, FIFO or socket"),
        (lambda tmp: tmp, "is a folder, not a spec file"),
        (
            lambda tmp: (tmp / "big.flow").write_text("#" * (MAX_SPEC_BYTES + 1)) and tmp / "big.flow",
            "is larger than 1 MiB",
        ),
        (lambda tmp: tmp / "a\0b.flow", "has a NUL byte in its path"),
        (
            lambda tmp: (tmp / "last.pt").write_bytes(b"PK\x03\x04\x14\x00\x08\x08\xff") and tmp / "last.pt",
            "is a checkpoint or an export, not a spec file (a run folder's spec is its spec.flow)",
        ),
    ],
    ids=["device", "fifo", "folder", "huge", "nul", "checkpoint"],
)
def test_only_regular_spec_files_of_bounded_size_are_read(tmp_path, make, reason):
    path = make(tmp_path)
    with not_waiting_on(path), pytest.raises(SpecError) as caught:
        load_spec(path)
    assert reason in str(caught.value) and str(caught.value).startswith("spec file ")
    base = tmp_path / "child.flow"
    base.write_text(f'extends "{os.fspath(path)}"\nmodel child\n'.replace("\0", "\\0"))
    if "\0" not in os.fspath(path):  # the same through extends, located at the extends line
        with not_waiting_on(path), pytest.raises(SpecError) as caught:
            load_spec(base)
        assert str(caught.value).startswith(f"{base}:1:1: extended spec ") and reason in str(caught.value)


def test_a_spec_file_that_is_not_utf8_is_refused_at_the_line_and_column_of_its_first_wrong_byte(
    tmp_path, capsys
):
    """A Latin-1 letter in a comment (an editor's other encoding) is named where it is, file:line:col with
    the line and a caret, as every other mistake of a spec: not by a byte offset, which no editor shows.
    Lines count as the parser counts them (a byte-order mark and CR LF line ends are not characters)."""
    base = tmp_path / "base.flow"
    base.write_bytes(b"\xef\xbb\xbfmodel base\r\nflow { squeeze }\r\n# caf\xe9 au lait \xff\r\n")
    with pytest.raises(SpecError) as caught:
        load_spec(base)
    assert str(caught.value) == (
        f"{base}:3:6: byte 0xe9 is not UTF-8 text: save the file as UTF-8\n    # caf? au lait ?\n         ^"
    )
    child = tmp_path / "child.flow"  # in an extended file: named in that file, where the byte is
    child.write_text('extends "base.flow"\nmodel child\n')
    assert run(["validate", str(child)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {base}:3:6: byte 0xe9 is not UTF-8 text") and "Traceback" not in err


def test_a_fifo_spec_on_the_command_line_exits_2_without_waiting(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo.flow")
    with not_waiting_on(tmp_path / "fifo.flow"):
        assert run(["validate", str(tmp_path / "fifo.flow")]) == 2
    assert "is a device, FIFO or socket, not a spec file" in capsys.readouterr().err


# ---------------------------------------------------------------- values that validate but break later


def test_seeds_are_bounded_in_the_spec_and_on_the_command_line(capsys):
    big = str(2**64)
    assert error_of(TINY + f"train {{ seed {big} }}\n").startswith(
        f"bad.flow:4:9: seed must be <= 4294967295, got {big}"
    )
    for command in (["sample", "run"], ["eval", "run"], ["ablate", "a.flow", "--steps", "1"]):
        for seed in (big, str(2**32)):
            assert run([*command, "--seed", seed]) == 2
            assert "'--seed'" in capsys.readouterr().err
        assert run([*command, "--seed", str(2**32 - 1)]) == 2  # accepted: then "run" is not found
        err = capsys.readouterr().err
        assert "'--seed'" not in err and ("does not exist" in err or "not found" in err)


def test_an_empty_flow_is_refused_and_a_parameterless_one_inspected(capsys):
    assert error_of("model empty\nflow { }\n").startswith("bad.flow:2:1: flow has no steps")
    squeeze_only = "model squeeze\ndata digits { shape 1x8x8 levels 17 }\nflow { squeeze }\n"
    spec = parse_spec(squeeze_only)
    from flowspec.inspection import inspect_spec

    assert inspect_spec(spec).total == 0


# ---------------------------------------------------------------- resource bombs

GiB = 2**30


@pytest.fixture
def small_machine(monkeypatch):
    """The memory budget of a small machine, whatever this one has."""
    from flowspec import devices

    monkeypatch.setattr(devices, "device_memory", lambda device="cpu": 2 * GiB)


def bomb(
    tmp_path: Path,
    data: str = "shape 1x8x8",
    coupling: str = "filters=8, blocks=1, components=2",
    steps: str = "",
) -> Path:
    path = tmp_path / "bomb.flow"
    body = steps or f"coupling(heads=2, {coupling}); flip"
    path.write_text(f"model bomb\ndata digits {{ {data} levels 17 }}\nflow {{ split stripe {{ {body} }} }}\n")
    return path


def test_repeats_that_multiply_to_a_billion_steps_are_refused_before_building(tmp_path, capsys):
    path = bomb(tmp_path, steps="repeat 1000 { repeat 1000 { repeat 1000 { flip } } }")
    assert run(["diff", str(path)]) == 2
    assert run(["inspect", str(path), "--probe", "--allow-large"]) == 2
    assert run(["validate", str(path)]) == 2  # validate refuses what every other command would
    err = capsys.readouterr().err
    assert err.count("the spec unrolls to") == 3
    assert err.startswith(
        f"error: {path}:3:23: the spec unrolls to 1,000,000,001 steps (repeat 1000 at flow.0.body.0"
    )
    assert "more than the 10,000 flowspec builds" in err


def test_more_written_steps_than_are_built_are_refused_without_a_repeat_to_blame(tmp_path, capsys):
    path = bomb(tmp_path, steps="norm; " * 10_000)
    assert run(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: {path}:3:8: the spec unrolls to 10,001 steps (10,001 steps written in flow), more than the "
        "10,000 flowspec builds; write fewer steps"
    )


@pytest.mark.parametrize(
    ("data", "coupling", "named"),
    [
        (
            "shape 1x8x8",
            "filters=4096, blocks=2, components=1024",
            "(coupling mixlogistic k1024 f4096 b2 h2 at",
        ),
        (
            "shape 1x16384x16384",
            "filters=8, blocks=1, components=2",
            "(coupling mixlogistic k2 f8 b1 h2 at",
        ),
    ],
    ids=["settings-at-their-maxima", "huge-images"],
)
def test_a_model_larger_than_the_machine_is_refused_before_allocating(
    tmp_path, capsys, small_machine, data, coupling, named
):
    path = bomb(tmp_path, data, coupling)
    for command in (
        ["inspect", str(path), "--probe"],
        ["train", str(path), "--out", str(tmp_path / "r")],
    ):
        assert run(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: bomb ({path}) is too large for this machine: ") and named in err
        assert "this process can still take 2.0 GiB of cpu memory" in err and err.rstrip().endswith(
            "or pass --allow-large to go ahead anyway"
        )
    assert not (tmp_path / "r").exists()


def test_allow_large_goes_ahead_and_a_small_model_passes(tmp_path, small_machine):
    from flowspec.inspection.budget import check_size

    spec = load_spec(bomb(tmp_path, "shape 1x4096x4096"))
    with pytest.raises(Exception, match="too large for this machine"):
        check_size(spec, "train")
    assert check_size(spec, "train", allow_large=True).parameters > 0
    import flowspec

    small = load_spec(bomb(tmp_path))
    counted = check_size(small, "train")
    assert counted.steps == 3 and counted.parameters == flowspec.build(small).count_parameters()["total"]


def test_the_cgroup_memory_limit_bounds_the_ram(monkeypatch):
    """A container's memory.max ("max": none) bounds the RAM a process may use, shared by the processes of
    a torchrun job on the machine."""
    import resource

    from flowspec import devices

    class CgroupFile:
        def __init__(self, path, text):
            assert str(path) == "/sys/fs/cgroup/memory.max"
            self.text = text

        def read_text(self):
            if self.text is None:
                raise FileNotFoundError(2, "No such file or directory")
            return self.text

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(devices, "HELD_AT_IMPORT", (0, 0))  # nothing resident or mapped yet
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    unbounded = ram if soft == resource.RLIM_INFINITY else min(ram, soft)
    for text, memory in [
        ("max\n", unbounded),
        (None, unbounded),
        (f"{4 * ram}\n", unbounded),
        ("1073741824\n", GiB),
    ]:
        monkeypatch.setattr(devices, "Path", lambda path, text=text: CgroupFile(path, text))
        assert devices.device_memory("cpu") == memory, text
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert devices.device_memory("cpu") == GiB // 2


def test_what_the_process_already_holds_and_maps_is_not_free(monkeypatch):
    """Under `ulimit -v` the address space torch already maps (VmSize, ~3.4 GiB) is not free, nor is the
    RAM the process holds resident (VmRSS), as they were at import: a 4 GiB limit leaves 0.6 GiB, not 4."""
    import resource

    from flowspec import devices
    from flowspec.inspection import budget

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setattr(devices, "HELD_AT_IMPORT", (GiB // 2, 34 * GiB // 10))
    monkeypatch.setattr(devices, "Path", lambda path: Path("/nonexistent/memory.max"))
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert devices.device_memory("cpu") == ram - GiB // 2
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (4 * GiB, resource.RLIM_INFINITY))
    assert devices.device_memory("cpu") == 4 * GiB - 34 * GiB // 10
    from conftest import SPECS

    spec = load_spec(SPECS / "flowpp_cifar.flow", overrides=("train.batch=30",))
    with pytest.raises(Exception, match="too large for this machine"):
        budget.check_size(spec, "train")


def test_ablate_refuses_a_model_larger_than_the_machine_before_anything_trains(
    tmp_path, capsys, monkeypatch, small_machine
):
    """Weights too large for the machine (data small: the ablation reads it before training), refused
    before the folder is made; and at --resume, a plan made with --allow-large, without it."""
    from flowspec.errors import UserError
    from flowspec.train import ablate
    from flowspec.train.ablation_plan import PLAN

    def fail(*_, **__):
        pytest.fail("trained before the size check")

    monkeypatch.setattr(ablate, "train", fail)
    path = bomb(tmp_path, "shape 1x8x8", "filters=4096, blocks=2, components=1024")
    out = tmp_path / "ablation"
    args = ["ablate", str(path), "--steps", "1", "--out", str(out), "--device", "cpu", "-q"]
    assert run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: bomb ({path}) is too large for this machine: ") and not out.exists()

    def stopped(*_, **__):
        raise UserError("stopped before training")

    monkeypatch.setattr(ablate, "train", stopped)
    run([*args, "--allow-large"])  # the plan is written, the run fails
    assert (out / PLAN).is_file()
    capsys.readouterr()
    monkeypatch.setattr(ablate, "train", fail)
    assert run(["ablate", "--resume", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: bomb ({path}) is too large for this machine: ")


def test_a_model_without_parameters_is_not_trained(tmp_path, capsys):
    path = bomb(tmp_path, steps="flip")
    assert run(["train", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "bomb has no trainable parameters" in capsys.readouterr().err


@pytest.mark.slow
def test_the_official_imagenet32_model_passes_the_limits():
    """Flow++ on ImageNet 32x32 as the official launcher sizes it (168,955,724 parameters there)."""
    from flowspec.inspection.budget import check_size

    spec = parse_spec(
        "model imagenet32\ndata npz { shape 3x32x32 levels 256 }\n"
        "defaults { coupling mixlogistic(components=32, filters=128, blocks=22, heads=4) }\n"
        "dequantize variational { context(filters=32, blocks=8)\n"
        "  split stripe { repeat 8 { norm; coupling(blocks=8); flip } } sigmoid }\n"
        "flow { split stripe { repeat 4 { norm; coupling; flip } }\n"
        "  split stripe { repeat 3 { norm; coupling; flip } } squeeze\n"
        "  split channel { repeat 3 { norm; coupling; flip } }\n"
        "  split stripe { repeat 3 { norm; coupling; flip } } }\n"
        "train { batch 32 }\n"
    )
    size = check_size(spec, "build")
    assert size.parameters > 168_000_000 and size.train < 20 * GiB  # a training step's peak at batch 32


def test_a_run_spec_json_that_is_a_fifo_is_never_read(trained, tmp_path):
    """Reading a FIFO would block: it is no run's recorded spec, and a spec.flow beside it no run's."""
    from flowspec.loader import is_run_spec, recorded_spec

    (tmp_path / "spec.flow").write_text((trained / "spec.flow").read_text())
    os.mkfifo(tmp_path / "spec.json")
    with not_waiting_on(tmp_path / "spec.json"):
        assert recorded_spec(tmp_path) is None
        assert not is_run_spec(tmp_path / "spec.flow")
    assert recorded_spec(trained) is not None


# ---------------------------------------------------------------- well-formed but wrong checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (3 steps)."""
    import torch
    from train_helpers import tiny_spec

    from flowspec.train.trainer import RunOptions, train

    out = tmp_path_factory.mktemp("hostile") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    train(tiny_spec(steps=3), RunOptions(out=out, device="cpu", quiet=True))
    torch.set_num_threads(before)
    return out


def rewrite(trained: Path, tmp_path: Path, change) -> Path:
    """A copy of the run's checkpoint with `change(payload)` applied, saved with a fresh checksum."""
    import torch

    from flowspec.train.checkpoint import LAST, save_atomic

    payload = torch.load(trained / LAST, weights_only=True)
    change(payload)
    save_atomic(payload, tmp_path / LAST)
    return tmp_path / LAST


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.update(model=[1, 2]), "model is not a state dict (names to tensors) (got list)"),
        (lambda p: p.pop("optimizer"), "no optimizer"),
        (lambda p: p.update(step=-5), "step is not a step count (an integer >= 0) (got int)"),
        (lambda p: p.update(step=2.5), "step is not a step count"),
        (lambda p: p.update(rng="x"), "rng is not a list of RNG states"),
        (
            lambda p: p["model"].update({k: v[:1] for k, v in p["model"].items() if v.dim() == 4}),
            "has shape (1,",
        ),
        (lambda p: p["model"].pop(next(iter(p["model"]))), "model lacks "),
        (
            lambda p: p["optimizer"]["state"][0].update(exp_avg=p["optimizer"]["state"][0]["exp_avg"][:1]),
            "optimizer state 0.exp_avg does not fit parameter 0",
        ),
        (lambda p: p.update(threads="2"), "threads is not a thread count (got str)"),
        (lambda p: p.update(train_seconds="1e3"), "train_seconds is not seconds (got str)"),
        (lambda p: p.update(precision="fp16"), "precision is not fp32 or bf16"),
        (lambda p: p.update(eval_options={"samples": -1}), "eval_options is not the --eval-* options given"),
        (lambda p: p.update(eval_options=["images"]), "eval_options is not the --eval-* options given"),
        (lambda p: p.update(log_every=0), "log_every is not a logging interval"),
        (lambda p: p["optimizer"]["param_groups"][0]["params"].pop(), "optimizer has "),
        (
            lambda p: p["ema"].update(
                {k: v[:1] for k, v in p["ema"].items() if k.startswith("module.") and v.dim() == 4}
            ),
            "ema.flow.",  # ema.<name> has shape (1, ...), the model (...)
        ),
        (lambda p: p.update(ema=None), "no EMA weights, though the spec keeps an EMA (ema 0.9)"),
        (lambda p: p.update(step=True), "step is not a step count (an integer >= 0) (got bool)"),
        (
            lambda p: p["model"].update(extra=next(iter(p["model"].values()))),
            "model has an unknown tensor extra",
        ),
    ],
    ids=[
        "model-not-a-state-dict",
        "no-optimizer",
        "negative-step",
        "float-step",
        "rng",
        "shapes",
        "missing",
        "adam",
        "threads",
        "train-seconds",
        "precision",
        "eval-options-value",
        "eval-options-type",
        "log-every",
        "optimizer-parameters",
        "ema-shape",
        "no-ema",
        "bool-step",
        "unknown-tensor",
    ],
)
def test_a_wrong_checkpoint_is_refused_naming_what_is_wrong(trained, tmp_path, capsys, change, message):
    from flowspec.errors import UserError
    from flowspec.train.checkpoint import load_checkpoint

    path = rewrite(trained, tmp_path, change)
    with pytest.raises(UserError) as caught:
        load_checkpoint(path)
    assert str(caught.value).startswith(f"checkpoint {path} is not a usable flowspec checkpoint: ")
    assert message in str(caught.value)
    assert run(["train", "--resume", str(tmp_path), "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_a_run_folder_with_only_its_best_pt_names_the_command_run_on_it(trained, tmp_path, capsys):
    """eval, sample and export of a run folder with a best.pt but no last.pt each say how they use it."""
    import shutil

    from flowspec.train.checkpoint import BEST

    shutil.copy(trained / BEST, tmp_path / BEST)
    exported = str(tmp_path / "m.safetensors")  # (export names the file it writes after the one it reads)
    for command in (["eval"], ["sample"], ["export"], ["export", "--out", exported]):
        assert run([command[0], str(tmp_path), *command[1:]]) == 2
        assert capsys.readouterr().err == (
            f"error: no last.pt in {tmp_path} (the checkpoint a run resumes from); its best.pt is there: "
            f"`flowspec {command[0]} {tmp_path / BEST}` uses it\n"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST]


def test_a_corrupt_checkpoint_names_the_other_of_its_run_where_that_one_reads(trained, tmp_path, capsys):
    """eval, sample and export of a run whose last.pt is truncated name the command on its best.pt when that
    reads (and the other way round); neither file is changed. Where the other is damaged too, or absent,
    the advice is to use another checkpoint."""
    import shutil

    from flowspec.train.checkpoint import BEST, LAST

    truncated = (trained / LAST).read_bytes()[:1000]
    (tmp_path / LAST).write_bytes(truncated)
    shutil.copy(trained / BEST, tmp_path / BEST)
    damaged = f"error: checkpoint {tmp_path / LAST} is corrupt or truncated and cannot be read"
    for command in ("eval", "sample", "export"):
        for target in (tmp_path, tmp_path / LAST):
            assert run([command, str(target)]) == 2
            err = capsys.readouterr().err
            assert err.startswith(damaged) and err.endswith(
                f"; it was left untouched: its run's best.pt can be read, and "
                f"`flowspec {command} {tmp_path / BEST}` uses it\n"
            )
    assert (tmp_path / LAST).read_bytes() == truncated
    (tmp_path / BEST).write_bytes(b"\x00" * 100)  # both damaged
    assert run(["eval", str(tmp_path)]) == 2
    assert capsys.readouterr().err.endswith("it was left untouched: use another checkpoint\n")
    shutil.copy(trained / LAST, tmp_path / LAST)  # a damaged best.pt beside a last.pt that reads
    assert run(["sample", str(tmp_path / BEST)]) == 2
    assert capsys.readouterr().err.endswith(
        f"its run's last.pt can be read, and `flowspec sample {tmp_path / LAST}` uses it\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST, LAST]


def test_flipped_bytes_inside_the_archive_are_detected(trained, tmp_path, capsys):
    import zipfile

    from flowspec.train.checkpoint import LAST

    data = bytearray((trained / LAST).read_bytes())
    with zipfile.ZipFile(trained / LAST) as archive:  # the largest tensor's bytes, inside the archive
        tensors = [e for e in archive.infolist() if "/data/" in e.filename]
        entry = max(tensors, key=lambda e: e.file_size)
        header = data[entry.header_offset : entry.header_offset + 30]
        start = (
            entry.header_offset
            + 30
            + int.from_bytes(header[26:28], "little")
            + int.from_bytes(header[28:30], "little")
        )
    middle = start + entry.file_size // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    (tmp_path / LAST).write_bytes(bytes(data))
    assert run(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: checkpoint {tmp_path / LAST} is corrupt: its content does not match the checksum stored "
        "when it was written; it was left untouched: use another checkpoint\n"
    )  # eval's advice; training's is to resume from another run folder or start a new run


def test_an_old_checkpoint_without_checksum_loads_with_a_warning(trained, tmp_path, capsys):
    import torch

    from flowspec.train.checkpoint import CHECKSUM, LAST, load_checkpoint

    payload = torch.load(trained / LAST, weights_only=True)
    del payload[CHECKSUM]
    torch.save(payload, tmp_path / LAST)
    assert load_checkpoint(tmp_path)["step"] == 3
    assert "has no checksum (written before flowspec stored one)" in capsys.readouterr().err


def test_resuming_a_checkpoint_without_checksum_warns_once(trained, tmp_path, capsys):
    """The command reads the checkpoint for its spec, then the run reads it to resume: one warning."""
    import shutil

    import torch

    from flowspec.train.checkpoint import CHECKSUM, LAST

    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    payload = torch.load(copy / LAST, weights_only=True)
    del payload[CHECKSUM]
    torch.save(payload, copy / LAST)
    code = run(["train", "--resume", str(copy), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0 and err.count("has no checksum") == 1, err


def test_a_malicious_pickle_is_never_run(tmp_path, capsys):
    import torch

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "pwned"),))

    torch.save({"model": Payload()}, tmp_path / "last.pt")
    assert run(["sample", str(tmp_path), "-o", str(tmp_path / "s.png")]) == 2
    assert "is corrupt or truncated and cannot be read (UnpicklingError)" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_a_checkpoint_that_is_a_fifo_a_device_or_a_link_to_nowhere_is_named_for_what_it_is(tmp_path, capsys):
    """Not "does not exist": a FIFO is never opened (it would block); a loop of links is said to be one."""
    os.mkfifo(tmp_path / "fifo.pt")
    os.mkfifo(tmp_path / "fifo.safetensors")
    (tmp_path / "dangling.pt").symlink_to(tmp_path / "nowhere.pt")
    (tmp_path / "loop.pt").symlink_to(tmp_path / "loop2.pt")
    (tmp_path / "loop2.pt").symlink_to(tmp_path / "loop.pt")
    cases = {
        tmp_path / "fifo.pt": "is a FIFO (named pipe), not a regular file",
        Path("/dev/null"): "is a character device, not a regular file",
        tmp_path / "dangling.pt": f"is a link to {tmp_path / 'nowhere.pt'}, which does not exist",
        tmp_path / "loop.pt": "is a symlink loop (a link that leads back to itself)",
    }
    for path, what in cases.items():
        for command in ("eval", "sample", "export"):
            assert run([command, str(path)]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: checkpoint {path} {what}: pass a run folder or a .pt file"), err
    assert run(["sample", str(tmp_path / "fifo.safetensors")]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {tmp_path / 'fifo.safetensors'} is a FIFO (named pipe), not a regular file: pass a file "
        "written by `flowspec export`"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dangling.pt",
        "fifo.pt",
        "fifo.safetensors",
        "loop.pt",
        "loop2.pt",
    ]


# ---------------------------------------------------------------- output paths and options


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "{tmp}"], "--out {tmp} is a folder: give a file name, e.g. {tmp}/out.png"),
        (["-o", "{tmp}/grid.xyz"], "--out {tmp}/grid.xyz: unknown file type '.xyz'; use one of .png, "),
        (["-o", "{tmp}/grid"], "unknown file type '(no extension)'"),
        (["-t", "inf"], "--temperature must be a finite number >= 0, got inf"),
        (["-t", "nan"], "--temperature must be a finite number >= 0, got nan"),
        (["-t", "-1"], "--temperature must be a finite number >= 0, got -1.0"),
        (["-n", "1000000000"], "-n 1,000,000,000 draws a grid of 1,000,000,000 images that needs about "),
        (["-n", "10000000000", "--batch", "10000000000"], "images at once (--batch), or pass --allow-large"),
    ],
    ids=["folder", "extension", "no-extension", "inf", "nan", "negative", "n", "batch"],
)
def test_sample_refuses_bad_outputs_and_options(trained, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    assert run(["sample", str(trained), *args]) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and "Traceback" not in err


def test_eval_refuses_a_folder_and_prints_its_table_when_it_cannot_write(
    trained, tmp_path, monkeypatch, capsys
):
    assert run(["eval", str(trained), "--out", str(tmp_path), "--limit", "4"]) == 2
    assert f"--out {tmp_path} is a folder: give a file name" in capsys.readouterr().err
    import errno

    from flowspec.train import files

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = run(["eval", str(trained), "--out", str(locked / "e.json"), "--limit", "4"])
    finally:
        locked.chmod(0o700)
    out, err = capsys.readouterr()
    if os.geteuid() != 0:  # refused before the evaluation
        assert code == 2 and out == ""
        assert err == (
            f"error: --out {locked / 'e.json'}: its folder cannot be made there ({locked} is a folder this "
            "user cannot write)\n"
        )
    else:  # root writes anywhere
        assert code == 0 and (locked / "e.json").is_file(), err
    with monkeypatch.context() as patched:  # permission denied at the write itself, for root too
        fail_on(patched, files, "_settle", errno.EACCES)
        assert run(["eval", str(trained), "--out", str(tmp_path / "e.json"), "--limit", "4"]) == 2
    out, err = capsys.readouterr()
    assert "single sample" in out
    assert (
        err == f"error: permission denied writing {tmp_path / 'e.json'}; the results are in the table above "
        "(--out FILE writes them elsewhere)\n"
    )
    fail_on(monkeypatch, files, "_settle", errno.EROFS)  # a read-only run folder, for root too
    assert run(["eval", str(trained), "--limit", "4"]) == 2
    out, err = capsys.readouterr()
    assert "single sample" in out and err.startswith(f"error: read-only file system writing {trained}")
    assert err.endswith("; the results are in the table above (--out FILE writes them elsewhere)\n")
    for iw in ("100000", "16385"):  # refused as it is read, before the run is looked at
        assert run(["eval", str(tmp_path / "none"), "--iw", iw]) == 2
        assert "Invalid value for '--iw'" in capsys.readouterr().err
    assert run(["eval", str(tmp_path / "none"), "--iw", "16384"]) == 2  # accepted: then the run is missing
    err = capsys.readouterr().err
    assert "'--iw'" not in err and "does not exist" in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", ["eval", "sample", "export"])
def test_an_out_where_the_file_system_refuses_folders_is_refused_before_any_work(trained, capsys, command):
    """/proc's permissions let root write, but it makes no folder: the output is refused up front (it was
    refused only after the whole evaluation), for every user, with the folder that refuses."""
    name = {"eval": "e.json", "sample": "s.png", "export": "m.safetensors"}[command]
    out = Path("/proc/flowspec-no-such-folder") / name
    assert run([command, str(trained), "--out", str(out)]) == 2
    printed, err = capsys.readouterr()
    assert printed == "" and err.startswith(f"error: --out {out}: its folder cannot be made there (/proc ")
    if os.geteuid() == 0:
        assert err.endswith("(/proc refuses new files: no such file or directory)\n")


def test_eval_refuses_more_images_at_once_than_the_machine_holds(trained, tmp_path, capsys, small_machine):
    """A forward pass holds --batch images, or fewer when there are fewer (--images, or a small split),
    each with its --iw importance samples: 297 test images with 16384 samples each do not fit."""
    assert run(["eval", str(trained), "--batch", "10000000000", "--iw", "16384"]) == 2
    err = capsys.readouterr().err
    assert (
        "is too large for this machine: " in err
        and f"and {297 * 16384:,} images, and this process can still take" in err
    )
    assert err.rstrip().endswith(
        "Take fewer images at once (--batch), or pass --allow-large to go ahead anyway"
    )
    assert run(["eval", str(trained), "--batch", "4", "--limit", "4", "--out", str(tmp_path / "e.json")]) == 0


@pytest.mark.parametrize(
    "args",
    [["--limit", "4"], ["--limit", "2", "--iw", "64"], [], ["--limit", "1000000000"]],
    ids=["images", "images-iw", "split", "images-beyond-the-split"],
)
def test_eval_takes_a_batch_larger_than_the_images_it_evaluates(
    trained, tmp_path, capsys, small_machine, args
):
    """`--batch` is the most images at once: with fewer images (--images, or a split of 297) the pass holds
    those alone, and fits."""
    out = tmp_path / "e.json"
    assert run(["eval", str(trained), "--batch", "9223372036854775807", *args, "--out", str(out)]) == 0, (
        capsys.readouterr().err
    )
    assert json.loads(out.read_text())["images"] == min(int(args[1]) if args else 297, 297)


def test_eval_sample_and_export_never_write_over_the_file_they_read(trained, tmp_path, capsys):
    """A standalone checkpoint or export named as the output, directly, under another suffix or through a
    link, is refused before any work, and stays as it was."""
    checkpoint = tmp_path / "ck.pt"
    checkpoint.write_bytes((trained / "last.pt").read_bytes())
    (tmp_path / "link.png").symlink_to(checkpoint)
    (tmp_path / "ck.png").write_bytes(checkpoint.read_bytes())
    (tmp_path / "ck.json").write_bytes(checkpoint.read_bytes())
    assert run(["export", str(trained), "-o", str(tmp_path / "m.safetensors")]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    cases = [
        (["sample", str(checkpoint), "-n", "2", "-o", str(tmp_path / "link.png")], f"leads to {checkpoint},"),
        (["sample", str(tmp_path / "ck.png"), "-n", "2", "-o", str(tmp_path / "ck.png")], "is"),
        (["eval", str(tmp_path / "ck.json"), "--images", "8", "-o", str(tmp_path / "ck.json")], "is"),
        (["export", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "m.safetensors")], "is"),
    ]
    for args, what in cases:
        assert run(args) == 2, args
        out, err = capsys.readouterr()
        assert err == (
            f"error: --out {args[-1]} {what} the file this command reads: writing it would destroy what it "
            "reads; choose another file name\n"
        )
        assert "wrote" not in out
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_an_output_that_is_a_fifo_a_device_or_a_link_to_nowhere_is_refused_and_kept(
    trained, tmp_path, capsys
):
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "null.png").symlink_to("/dev/null")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop2.png")
    (tmp_path / "loop2.png").symlink_to(tmp_path / "loop.png")
    cases = {
        "fifo.png": "is a FIFO (named pipe), not a regular file",
        "null.png": "is a character device, not a regular file",
        "dangling.png": f"is a link to {tmp_path / 'nowhere.png'}, which does not exist",
        "loop.png": "is a symlink loop (a link that leads back to itself)",
    }
    for name, what in cases.items():
        assert run(["sample", str(trained), "-n", "2", "-o", str(tmp_path / name)]) == 2
        assert capsys.readouterr().err == (
            f"error: --out {tmp_path / name} {what}: only a new file or a regular one is written; choose "
            "another file name\n"
        )
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo.png").st_mode)
    assert all((tmp_path / name).is_symlink() for name in ("null.png", "dangling.png", "loop.png"))
    assert not (tmp_path / "nowhere.png").exists()


# ---------------------------------------------------------------- disks, permissions, two processes


def test_outputs_never_overwrite_the_files_of_a_run_or_an_ablation(trained, tmp_path, capsys):
    """`eval --out RUN/spec.json` would replace the spec that tells a run's own checkpoints from copied ones;
    a run's curves and grids, and an ablation's table, are refused alike, also through a link."""
    (tmp_path / "ablation").mkdir()
    (tmp_path / "ablation" / "ablation.json").write_text("{}")
    (tmp_path / "link.json").symlink_to(trained / "spec.json")
    before = {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()}
    table = tmp_path / "ablation" / "ablation.json"
    cases = [  # the files a run reads again are said to be (a resume reads its spec.json)
        (["eval", str(trained), "--out", str(trained / "spec.json")], trained / "spec.json", "the run", True),
        (
            ["eval", str(trained), "--out", str(tmp_path / "link.json")],
            trained / "spec.json",
            "the run",
            True,
        ),
        (
            ["sample", str(trained), "-o", str(trained / "curves.png")],
            trained / "curves.png",
            "the run",
            False,
        ),
        (["eval", str(trained), "-o", str(table)], table, "the ablation", False),
    ]
    for args, target, what, reads in cases:
        assert run([*args, "--limit" if args[0] == "eval" else "-n", "4"]) == 2
        err = capsys.readouterr().err
        said = (
            f"would overwrite {target}, which {what} in {target.parent} writes{' and reads again' * reads}:"
        )
        assert said in err and err.startswith(f"error: --out {args[-1]} ") and err.count("\n") == 1
    grid = trained / "samples" / "s.png"  # a new file, in the folder of the run's grids
    assert run(["sample", str(trained), "-o", str(grid), "-n", "4"]) == 2
    assert capsys.readouterr().err == (
        f"error: --out {grid} would write {grid} into {grid.parent}, which the run in {trained} writes: "
        "choose a file outside it\n"
    )
    assert {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()} == before
    assert (tmp_path / "ablation" / "ablation.json").read_text() == "{}"


def tiny_flow(tmp_path: Path) -> Path:
    from train_helpers import write_flow

    return write_flow(tmp_path / "tiny.flow", steps=6, eval_every=3)


def fail_on(monkeypatch, module, name: str, code: int, when=lambda n, args: True) -> None:
    """Make the `n`-th call of `module.name` raise OSError(`code`) (without a file name, like a failed
    write) when `when(n, args)`."""
    import builtins

    real = getattr(module, name, None) or getattr(builtins, name)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if when(calls["n"], args):
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing, raising=False)


def at_step_6(n, args) -> bool:
    """The checkpoint written at step 6 (the second evaluation; the first wrote step 3)."""
    return isinstance(args[0], dict) and args[0].get("step") == 6


@pytest.mark.parametrize(
    ("where", "failed", "kept"),
    [
        ("checkpoint", "last.pt", 3),
        ("metrics", "metrics.jsonl", 6),  # the checkpoint is written before each evaluation
        ("samples", "samples/step0000006_t1.0.png", 6),
    ],
)
def test_a_full_disk_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, capsys, where, failed, kept
):
    import errno
    import json

    from flowspec.train import checkpoint, metrics
    from flowspec.train.checkpoint import LAST, load_checkpoint

    out = tmp_path / "my run"
    target = {
        "checkpoint": (checkpoint.torch, "save", at_step_6),
        "samples": (Path, "write_bytes", lambda n, args: n > 2),  # the grids' writes: step 6's first
    }
    sizes = []
    if where == "metrics":  # after step 1's train row and the first eval row, half a row reaches the disk
        real_open, opened = open, []

        def half_a_row(*args, **kwargs):
            f = real_open(*args, **kwargs)
            opened.append(args[0])
            if len(opened) > 2:
                sizes.append(os.path.getsize(args[0]))

                def write(text):
                    f.buffer.write(text[: len(text) // 2].encode())
                    f.buffer.flush()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                f.write = write
            return f

        monkeypatch.setattr(metrics, "open", half_a_row, raising=False)
    else:
        module, name, when = target[where]
        fail_on(monkeypatch, module, name, errno.ENOSPC, when)
    assert run(["train", str(tiny_flow(tmp_path)), "--out", str(out), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: no space left writing {out / failed}; the last good checkpoint {out / LAST} (step {kept}) "
        "is kept; free space or make the folder writable, then continue with: "
        f"flowspec train --resume '{out}'\n"  # a folder with a space is one word of the command
    )
    assert load_checkpoint(out)["step"] == kept
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if metrics.is_eval(r)][0] == 3
    assert not [p.name for p in out.glob("*tmp*")]
    if where == "metrics":  # the half row written was undone
        assert sizes == [(out / "metrics.jsonl").stat().st_size]
        assert (out / "metrics.jsonl").read_bytes().endswith(b"\n")


def test_a_full_disk_while_drawing_curves_keeps_the_old_curves_png(tmp_path, monkeypatch):
    """`curves.png` is drawn to a temporary file and renamed: a write cut short leaves the old picture and
    no temporary file, and the error names curves.png."""
    import errno

    from matplotlib.figure import Figure

    from flowspec.train.metrics import CURVES, plot_curves

    rows = {"run": [{"step": 1, "train_bpd": 3.0, "lr": 1e-3}, {"step": 2, "train_bpd": 2.9, "lr": 1e-3}]}
    path = tmp_path / CURVES
    plot_curves(rows, path, "run")
    old = path.read_bytes()

    def cut_short(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half a picture")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", cut_short)
    with pytest.raises(OSError) as caught:
        plot_curves({"run": [*rows["run"], {"step": 3, "train_bpd": 2.8, "lr": 1e-3}]}, path, "run")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == [CURVES]


def test_a_run_that_failed_before_its_first_checkpoint_starts_again_in_its_folder(
    tmp_path, monkeypatch, capsys
):
    """Its folder can be neither resumed nor used: the messages say so and what to do, and the same command
    starts the run again there, its files moved to `<folder>.before-<time>` (a folder holding anything else
    is still refused)."""
    import errno

    from flowspec.train import checkpoint

    out, flow = tmp_path / "my run", tiny_flow(tmp_path)
    command = ["train", str(flow), "--out", str(out), "--device", "cpu", "--max-steps", "3"]
    with monkeypatch.context() as patched:
        fail_on(patched, checkpoint.torch, "save", errno.ENOSPC)
        assert run([*command, "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"error: no space left writing {out / 'last.pt'}; no checkpoint was written yet; the same command "
        f"with --out '{out}' starts the run again there, setting this run's files aside (into "
        "my run.before-<time> beside it)\n"
    )
    files = sorted(p.name for p in out.iterdir())
    assert files == [".lock", "metrics.jsonl", "spec.flow", "spec.json"]
    for refused in (["train", "--resume", str(out)], ["eval", str(out)]):
        assert run(refused) == 2
        assert (
            f"its run stopped before writing last.pt, so there is nothing to use or resume; `flowspec train "
            f"SPEC --out '{out}'` (the run's command) starts it again there" in capsys.readouterr().err
        )
    assert run([*command, "--quiet"]) == 0  # the note still shows: the files moved
    (aside,) = tmp_path.glob("my run.before-*")
    assert (
        f"note: {out} held a run that stopped before its first checkpoint: this one starts afresh; its "
        f"files are in {aside}" in capsys.readouterr().out
    )
    assert sorted(p.name for p in aside.iterdir()) == files[1:] and (out / "last.pt").is_file()


def test_a_run_folder_given_as_dot_that_never_checkpointed_starts_again(tmp_path, monkeypatch, capsys):
    """`--out .`: its files are set aside beside the working folder, named after it."""
    import errno

    from flowspec.train import checkpoint

    flow, out = tiny_flow(tmp_path), tmp_path / "my run"
    out.mkdir()
    monkeypatch.chdir(out)
    command = ["train", str(flow), "--out", ".", "--device", "cpu", "--max-steps", "1"]
    with monkeypatch.context() as patched:
        fail_on(patched, checkpoint.torch, "save", errno.ENOSPC)
        assert run([*command, "--quiet"]) == 2
    assert capsys.readouterr().err.endswith(
        "setting this run's files aside (into my run.before-<time> beside it)\n"
    )
    assert run(command) == 0
    (aside,) = tmp_path.glob("my run.before-*")
    assert f"its files are in {aside}\n" in capsys.readouterr().out
    assert (aside / "spec.json").is_file() and (out / "last.pt").is_file()


def test_a_failed_read_during_a_run_is_said_to_be_a_read(tmp_path, monkeypatch, capsys):
    """Not `error writing`, and no advice to free space or make the folder writable."""
    import errno

    real = Path.read_bytes

    def failing(path: Path) -> bytes:
        if path.name == "metrics.jsonl":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(path)

    monkeypatch.setattr(Path, "read_bytes", failing)
    out = tmp_path / "run"
    command = ["train", str(tiny_flow(tmp_path)), "--out", str(out), "--device", "cpu", "--max-steps", "3"]
    assert run([*command, "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"error: error reading {out / 'metrics.jsonl'}: {os.strerror(errno.EIO)}; the last good checkpoint "
        f"{out / 'last.pt'} (step 3) is kept; continue with: flowspec train --resume {out} --max-steps 3\n"
    )


def test_a_full_disk_as_torch_reports_it_is_a_full_disk_not_a_bug(tmp_path, monkeypatch, capsys):
    """On a real full disk torch's checkpoint writer raises a RuntimeError ("unexpected pos") over the
    OSError of the failed write."""
    import errno

    import torch

    from flowspec.train import checkpoint
    from flowspec.train.checkpoint import LAST, load_checkpoint

    real = torch.save

    def full_disk_at_step_6(payload, f, *args, **kwargs):
        if payload.get("step") != 6:
            return real(payload, f, *args, **kwargs)
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 750656") from None

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_at_step_6)
    out = tmp_path / "run"
    assert run(["train", str(tiny_flow(tmp_path)), "--out", str(out), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: no space left writing {out / LAST}; the last good checkpoint")
        and "bug" not in err
    )
    assert load_checkpoint(out)["step"] == 3 and not [p.name for p in out.glob("*tmp*")]


def test_a_read_only_run_folder_stops_the_run_with_a_message(tmp_path, monkeypatch, capsys):
    import errno

    fail_on(monkeypatch, Path, "write_bytes", errno.EROFS)  # a sample grid's write
    out = tmp_path / "run"
    assert run(["train", str(tiny_flow(tmp_path)), "--out", str(out), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: read-only file system writing {out / 'samples' / 'step0000003_t1.0.png'}; "
    )
    assert f"the last good checkpoint {out / 'last.pt'} (step 3) is kept" in err  # written before evaluating


def test_a_read_only_run_folder_at_resume_names_metrics_and_changes_nothing(
    trained, tmp_path, monkeypatch, capsys
):
    """Resuming first cuts `metrics.jsonl` back to the checkpoint; where that cannot be written, the error
    names that file (not its temporary one), says writing, and that nothing changed (simulated: root
    writes into a read-only folder)."""
    import errno
    import shutil

    copy = tmp_path / "my run"
    shutil.copytree(trained, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    real = Path.write_text

    def read_only(self, *args, **kwargs):
        if self.parent == copy:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    assert run(["train", "--resume", str(copy), "--device", "cpu", "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"error: permission denied writing {copy / 'metrics.jsonl'}; the run was not resumed and nothing in "
        f"{copy} was changed (last.pt of step 3 is kept): make the folder writable, then "
        f"continue with: flowspec train --resume '{copy}'\n"
    )
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_os_errors_say_writing_or_reading_and_a_file_size_limit(trained, tmp_path, monkeypatch, capsys):
    """A write that passes a file-size limit (EFBIG: `ulimit -f`, FAT's 4 GiB) says so and `writing`, also
    where the command line's boundary prints it; an error without a reason of its own keeps the OS's."""
    import errno

    from flowspec.errors import naming, os_error_message
    from flowspec.train import files

    fail_on(monkeypatch, files, "_settle", errno.EFBIG)
    assert run(["sample", str(trained), "-n", "4", "-o", str(tmp_path / "grid.png")]) == 2
    assert capsys.readouterr().err == (
        f"error: file too large writing {tmp_path / 'grid.png'} (a file-size limit: the file system's, or "
        "`ulimit -f`)\n"
    )
    with pytest.raises(OSError) as caught, naming(tmp_path / "m.jsonl", "reading"):
        (tmp_path / "m.jsonl").read_bytes()
    assert (
        os_error_message(caught.value) == f"error reading {tmp_path / 'm.jsonl'}: No such file or directory"
    )
    assert os_error_message(OSError(errno.EIO, "Input/output error", "/d/x")) == (
        "error accessing /d/x: Input/output error"
    )


def test_a_second_process_on_a_run_folder_is_refused(tmp_path, capsys):
    import socket

    from train_helpers import ELSEWHERE, held_by_another_process

    from flowspec.train.lock import RunLock

    flow, out = tiny_flow(tmp_path), tmp_path / "run"
    with held_by_another_process(out):
        assert run(["train", str(flow), "--out", str(out), "--device", "cpu", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: run folder {out} is in use by {ELSEWHERE}") and "another --out" in err
        assert run(["train", "--resume", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by {ELSEWHERE}" in err and "wait for it to finish" in err and "--out" not in err
    with RunLock(out):  # a second lock in this process (flock: per open file) is refused too
        assert run(["train", str(flow), "--out", str(out), "--device", "cpu", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(
            f"error: run folder {out} is in use by pid {os.getpid()} on {socket.gethostname()}"
        )
    # the lock file a dead holder leaves does not block: the kernel dropped its flock
    (out / ".lock").write_text("pid 1 on elsewhere since long ago\n")
    assert run(["train", str(flow), "--out", str(out), "--device", "cpu", "--quiet", "--max-steps", "3"]) == 0


def test_stale_temporary_files_are_removed_at_the_next_start(tmp_path, monkeypatch):
    """The temporary files of every write a run or an ablation makes, left by a killed process (made by the
    writers themselves, so that their names are the ones a run leaves): only those; the user's `*.tmp` files
    and another command's output in progress (`eval` writing its JSON into the folder) stay."""
    from matplotlib.figure import Figure

    from flowspec.train import metrics
    from flowspec.train.files import replaced_whole
    from flowspec.train.lock import RunLock

    (tmp_path / "samples").mkdir()
    unfinished, left = [], []  # writes whose blocks never end, as in a killed process; what they left
    written = ("last.pt", "best.pt", "nonfinite_batch.pt", "nonfinite_batch_rank1.pt", "spec.json")
    written += ("spec.flow", "ablation-plan.json", "ablation.json", "samples/step0000003_t1.0.png")
    for name in written:
        unfinished.append(replaced_whole(tmp_path / name))
        left.append(unfinished[-1].__enter__())
        left[-1].write_bytes(b"half")

    def killed(*args, **kwargs):  # records the temporary file, then stops the write
        left.append(Path(args[1] if isinstance(args[0], Figure) else args[0]))
        raise OSError("killed")

    with monkeypatch.context() as patched:
        patched.setattr(Figure, "savefig", killed)
        patched.setattr(metrics.os, "replace", killed)
        with pytest.raises(OSError, match="killed"):
            metrics.plot_curves({}, tmp_path / metrics.CURVES)
        with pytest.raises(OSError, match="killed"):
            metrics.truncate_metrics(tmp_path, 0)
    for path in left[-2:]:  # as the killed writes left them
        path.write_bytes(b"half")
    kept = ["important.tmp", ".draft.tmp", "last.pt"]
    for name in kept:
        (tmp_path / name).write_text("precious")
    with replaced_whole(tmp_path / "eval_test.json") as partial:
        partial.write_text("{}")
        with RunLock(tmp_path, clean=False) as lock:
            assert sorted(lock.remove_stale()) == sorted(left)
    assert len(set(left)) == len(written) + 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".lock", "eval_test.json", "samples", *kept])
    assert not list((tmp_path / "samples").iterdir())


def test_a_refused_run_leaves_the_folder_as_it_was(tmp_path, capsys):
    """A folder refused (an earlier run's files) keeps its temporary files and gets no lock file."""
    out = tmp_path / "x"
    out.mkdir()
    files = {"important.tmp": "precious", ".draft.tmp": "precious", ".last.pt.abc123.tmp.pt": "half"}
    for name, text in {**files, "metrics.jsonl": "old"}.items():
        (out / name).write_text(text)
    before = sorted(out.iterdir())
    assert run(["train", str(tiny_flow(tmp_path)), "--out", str(out), "--max-steps", "1", "--quiet"]) == 2
    assert f"{out} already holds metrics.jsonl of an earlier run" in capsys.readouterr().err
    assert sorted(out.iterdir()) == before


def test_a_file_system_without_locks_is_a_user_error(tmp_path, monkeypatch, capsys):
    """flock failing with ENOSYS (Lustre without -o flock) or ENOLCK (NFS without lockd): exit 2 naming the
    lock file, for the run folder and for the data cache; a folder without locks has no holder to name."""
    import errno
    import fcntl

    from flowspec.errors import UserError
    from flowspec.train.datacache import cached
    from flowspec.train.lock import check_free

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "r"
    assert run(["train", str(tiny_flow(tmp_path)), "--out", str(out), "--max-steps", "5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot lock {out / '.lock'}: the file system does not support file locks")
    assert "choose an --out folder on a local disk" in err and not out.exists()
    with pytest.raises(UserError, match=r"cannot lock .*\.lock: .* set FLOWSPEC_CACHE_DIR to a folder on a"):
        cached(tmp_path / "cache", {"source": "x"}, [1], lambda folder: pytest.fail("built unlocked"))
    out.mkdir()
    (out / ".lock").write_text("")
    check_free(out)


def test_eval_sample_and_export_name_the_run_writing_its_first_checkpoint(tmp_path, capsys):
    from train_helpers import ELSEWHERE, held_by_another_process

    out = tmp_path / "run"
    with held_by_another_process(out):
        for command in ("eval", "sample", "export"):
            assert run([command, str(out)]) == 2
            err = capsys.readouterr().err
            assert f"run folder {out} is in use by {ELSEWHERE}" in err and "no checkpoint" not in err
            assert "has not written its first checkpoint yet; wait for that" in err and "--out" not in err
    assert run(["eval", str(out)]) == 2
    assert f"no checkpoint in {out}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("signum", "code", "said"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_a_signal_while_torch_is_imported_waits_for_the_import_then_stops(
    tmp_path, monkeypatch, capsys, signum, code, said
):
    """An interrupt inside torch's or numpy's import broke them (odd errors, an abort): it is held until
    the import is done, then the command stops before doing anything."""
    from flowspec.cli import app

    imported = []
    monkeypatch.setattr(app, "_preload", lambda: (os.kill(os.getpid(), signum), imported.append(1)))
    out = tmp_path / "run"
    assert run(["train", str(tiny_flow(tmp_path)), "--out", str(out), "--device", "cpu"]) == code
    assert imported == [1] and capsys.readouterr().err.startswith(f"error: {said} (")
    assert not out.exists()
    assert run(["validate", str(tiny_flow(tmp_path))]) == 0  # validate and show need no torch: no wait
    assert imported == [1]


def test_help_of_a_torch_command_does_not_wait_for_torch(monkeypatch, capsys):
    from flowspec.cli import app

    monkeypatch.setattr(app, "_preload", lambda: pytest.fail("imported torch for --help"))
    assert run(["train", "--help"]) == 0 and "--resume" in capsys.readouterr().out


def test_inference_counts_what_the_largest_step_holds_per_image_not_a_training_step(monkeypatch):
    """eval and sample hold one step's activations at a time: a batch that fits so is not refused for
    what a training step would keep (every step's, for backward)."""
    from conftest import SPECS

    from flowspec import devices
    from flowspec.inspection import budget

    spec = load_spec(SPECS / "quickstart.flow")
    size = budget.measure(spec)
    assert 0 < size.largest_step < size.per_image
    need = size.weights + 64 * size.largest_step
    monkeypatch.setattr(devices, "device_memory", lambda device="cpu": need)
    assert budget.check_size(spec, "infer", images=64) == size
    with pytest.raises(Exception, match="too large for this machine") as refused:
        budget.check_size(spec, "infer", images=65)
    assert "Take fewer images at once (--batch)" in str(refused.value)


def test_a_spec_file_of_one_mib_is_read_and_one_byte_more_is_refused(tmp_path):
    """The cap is 1 MiB (2**20 bytes), the size itself allowed."""
    path = tmp_path / "big.flow"
    head = "model m\nflow { split stripe { coupling; flip } }\n"
    path.write_text(head + "#" * (2**20 - len(head)))
    assert read_spec_file(path).startswith(head)
    path.write_text(head + "#" * (2**20 + 1 - len(head)))
    with pytest.raises(SpecFileError, match="is larger than 1 MiB"):
        read_spec_file(path)
