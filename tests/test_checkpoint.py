"""Checkpoints: atomic writes, clear errors for corrupt, truncated or foreign files, which stay untouched."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import subprocess
import sys

import pytest
import torch
from train_helpers import tiny_spec

import flowspec
from flowspec.cli.app import run
from flowspec.errors import UserError
from flowspec.train.checkpoint import (
    BEST,
    CHECKSUM,
    LAST,
    check_same_spec,
    checkpoint_spec,
    ema_weights,
    load_checkpoint,
    save_atomic,
    spec_hash,
)
from flowspec.train.metrics import read_metrics
from flowspec.train.trainer import RunOptions, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(tiny_spec(steps=3), RunOptions(out=out, device="cpu", quiet=True))
    return out


def test_checkpoint_contents(run_dir):
    payload = load_checkpoint(run_dir)
    assert payload["step"] == 3 and (run_dir / BEST).is_file()
    assert payload["spec_hash"] == spec_hash(tiny_spec(steps=3))
    assert checkpoint_spec(payload, run_dir) == tiny_spec(steps=3)
    assert payload["versions"]["torch"] == torch.__version__ and "flowspec" in payload["versions"]
    for key in ("optimizer", "scheduler", "ema", "rng", "epoch"):
        assert payload[key] is not None
    final = read_metrics(run_dir)[-1]  # the evaluation at step 3, after which last.pt was written
    assert payload["epoch"] > 0 and payload["epoch"] == pytest.approx(final["epoch"], abs=1e-4)
    assert set(ema_weights(payload)) == set(payload["model"])
    assert not list(run_dir.glob(".*.tmp"))  # no temporary files left behind


def test_truncated_checkpoint_is_a_clear_error_and_untouched(run_dir, tmp_path):
    broken = tmp_path / "run"
    broken.mkdir()
    data = (run_dir / LAST).read_bytes()
    (broken / LAST).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=rf"{broken / LAST} is corrupt or truncated.*start a new run$"):
        load_checkpoint(broken)
    with pytest.raises(UserError, match=r"truncated and cannot be read .*: use another checkpoint$"):
        load_checkpoint(broken, training_state=False)  # to evaluate, sample or export
    with pytest.raises(UserError, match="corrupt or truncated"):
        train(tiny_spec(steps=3), RunOptions(out=broken, device="cpu", quiet=True, resume=True))
    assert (broken / LAST).read_bytes() == data[: len(data) // 2]


def test_garbage_and_foreign_files(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="garbage.pt is corrupt"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="other.pt is not a flowspec checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(
        UserError, match="does not exist: pass a run folder or a .pt file written by `flowspec train`$"
    ):
        load_checkpoint(tmp_path / "missing.pt")  # training state: an export will not do
    with pytest.raises(UserError, match="no checkpoint in"):
        load_checkpoint(tmp_path)


def test_resume_with_a_different_spec_is_refused(run_dir):
    before = (run_dir / LAST).read_bytes()
    other = tiny_spec(steps=3, lr=1e-2)
    with pytest.raises(UserError, match=r"different spec \(differences: train.lr: 0.003 -> 0.01\)"):
        train(other, RunOptions(out=run_dir, device="cpu", quiet=True, resume=True))
    assert (run_dir / LAST).read_bytes() == before


def test_a_resume_refusal_words_its_differences_as_a_flow_file_does_and_counts_those_left_out():
    """Values as a .flow file or --set writes them (1x8x8, digits, off), not as Python ((1, 8, 8),
    'digits', None), without the eval settings a resume may change; past five, how many more. A spec that
    differs only where `flowspec diff` shows nothing (a step schedule's `every` under a constant one) says
    so."""
    from flowspec.spec import DataSpec, EvalSpec
    from flowspec.train.checkpoint import spec_record

    cifar = DataSpec(dataset="cifar10", shape=(3, 32, 32), levels=256)
    other = tiny_spec(steps=3, data=cifar, name="other", ema=None, hflip=True)
    with pytest.raises(UserError) as refused:
        check_same_spec(
            spec_record(tiny_spec(steps=3)), other.model_copy(update={"eval": EvalSpec(images=16)}), "r"
        )
    assert str(refused.value) == (
        "checkpoint r was trained with a different spec (differences: model: tiny -> other; data.dataset: "
        "digits -> cifar10; data.shape: 1x8x8 -> 3x32x32; data.levels: 17 -> 256; train.ema: 0.9 -> off; "
        "and 1 more); a resume may change only the eval settings and `save every`: resume with the spec it "
        "was trained with (or none, for the stored one) and --set only those"
    )
    unused = r"different spec \(it differs only in settings it does not use: train\.step_every\); "
    with pytest.raises(UserError, match=unused):
        check_same_spec(spec_record(tiny_spec(steps=3)), tiny_spec(steps=3, step_every=5), "r")  # constant


def test_a_new_run_never_overwrites_an_old_one(run_dir):
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny_spec(steps=3), RunOptions(out=run_dir, device="cpu", quiet=True))


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"a": torch.ones(1)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"a": Boom()}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_checkpoint_from_before_a_new_setting_still_fits(run_dir):
    payload = load_checkpoint(run_dir)
    stored = json.loads(payload["spec"])
    del stored["train"]["accumulate"]  # as written before `accumulate` existed
    text = json.dumps(stored)
    old = {**payload, "spec": text, "spec_hash": hashlib.sha256(text.encode()).hexdigest()}
    assert checkpoint_spec(old, run_dir) == tiny_spec(steps=3)
    check_same_spec(old, tiny_spec(steps=3), run_dir)  # the same spec: no error
    with pytest.raises(UserError, match="inconsistent"):
        checkpoint_spec({**old, "spec_hash": "0" * 64}, run_dir)


def test_an_unreadable_checkpoint_is_called_unreadable_not_corrupt(tmp_path, monkeypatch):
    path = tmp_path / LAST
    path.write_bytes(b"x")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(UserError, match="last.pt cannot be read: permission denied"):
        load_checkpoint(path)


def test_outputs_are_replaced_whole_or_not_at_all(tmp_path):
    """eval's JSON, sample grids, ablation.json and the run's spec files are written beside and renamed."""
    from flowspec.train.files import replaced_whole

    target = tmp_path / "eval_test.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="killed"), replaced_whole(target) as partial:
        assert partial.parent == tmp_path and partial.suffix == ".json" and partial != target
        partial.write_text("half of the new")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["eval_test.json"]
    with replaced_whole(target) as partial:
        partial.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["eval_test.json"]


def test_a_last_pt_copied_from_another_run_is_refused_before_anything_changes(run_dir, tmp_path):
    import shutil

    other = tmp_path / "other"
    train(tiny_spec(steps=2, lr=1e-2), RunOptions(out=other, device="cpu", quiet=True))
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.copy(other / LAST, copy / LAST)
    metrics = (copy / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"last.pt does not belong to the run in .*copy: it was trained with"):
        flowspec.train(resume=copy, device="cpu", quiet=True)  # no spec: the checkpoint's own
    assert (copy / "metrics.jsonl").read_text() == metrics
    assert flowspec.train(resume=run_dir, device="cpu", quiet=True).step == 3  # its own run resumes


def test_a_spec_json_written_over_is_refused_at_resume_not_taken_for_no_spec(run_dir, tmp_path):
    """`eval --out RUN/spec.json` (refused now) used to leave a folder whose copied-in `last.pt` resumed: an
    unreadable spec.json is an error naming it; without one there is nothing to compare with."""
    import shutil

    other = tmp_path / "other"
    train(tiny_spec(steps=2, lr=1e-2), RunOptions(out=other, device="cpu", quiet=True))
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.copy(other / LAST, copy / LAST)
    (copy / "spec.json").write_text('{"bpd": 2.1}\n')  # what eval writes
    metrics = (copy / "metrics.jsonl").read_text()
    with pytest.raises(
        UserError, match=r"copy/spec.json is not the resolved spec of a run \(written over\?\)"
    ):
        flowspec.train(resume=copy, device="cpu", quiet=True)
    assert (copy / "metrics.jsonl").read_text() == metrics
    (copy / "spec.json").write_bytes(b"\xff\xfe")  # not even text
    with pytest.raises(UserError, match=r"copy/last.pt cannot be checked to belong to this run"):
        flowspec.train(resume=copy, device="cpu", quiet=True)
    (copy / "spec.json").unlink()
    assert flowspec.train(resume=copy, device="cpu", quiet=True, max_steps=2).step == 2


def test_a_spec_json_that_is_a_fifo_is_refused_at_resume_not_read(run_dir, tmp_path):
    """Reading a FIFO waits for a writer: the resume would hang."""
    import os
    import shutil
    import threading

    from flowspec.train.rundir import previous_checkpoint

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "spec.json").unlink()
    os.mkfifo(copy / "spec.json")
    done = threading.Event()

    def writer() -> None:  # one that writes nothing, once something reads: a read returns "", not hangs
        while not done.wait(0.1):
            with contextlib.suppress(OSError):  # no reader yet
                os.close(os.open(copy / "spec.json", os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=writer, daemon=True).start()
    try:
        with pytest.raises(UserError, match=r"spec.json is a FIFO \(named pipe\), not a regular file, so "):
            previous_checkpoint(copy, tiny_spec(steps=3), resume=True)
    finally:
        done.set()


def test_a_checkpoint_of_the_bits_per_dim_loss_says_so_when_resumed(run_dir, tmp_path, capsys):
    """The note of how a run of the old loss goes on (`Updater.note`) is printed, also with -q."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    payload = load_checkpoint(copy)
    save_atomic({k: v for k, v in payload.items() if k not in ("loss", CHECKSUM)}, copy / LAST)
    capsys.readouterr()
    assert run(["train", "--resume", str(copy), "--device", "cpu", "--threads", "1", "-q"]) == 0
    assert "note: this run began under an earlier flowspec, whose loss was bits/dim" in capsys.readouterr()[0]


def test_outputs_replaced_whole_get_a_new_files_permissions_and_follow_links(tmp_path):
    import os

    from flowspec.train.files import replaced_whole

    umask = os.umask(0o022)
    try:
        target = tmp_path / "grid.png"
        link = tmp_path / "latest.png"
        target.write_text("old")
        link.symlink_to(target)
        with replaced_whole(link) as partial:
            partial.write_text("new")
        assert link.is_symlink() and target.read_text() == "new"
        assert target.stat().st_mode & 0o777 == 0o644  # not mkstemp's owner-only 0o600
    finally:
        os.umask(umask)


def test_a_real_failed_write_of_a_checkpoint_is_an_os_error_naming_the_file(tmp_path):
    """torch's writer given a path reports a failed write (a full disk) as a RuntimeError with no OSError
    under it ("basic_ios::clear: iostream error"); through a Python file the OSError is there. A file
    size limit makes a real failed write here (EFBIG, as ENOSPC on a full disk)."""
    script = (
        "import resource, signal, sys, torch\n"
        "from pathlib import Path\n"
        "from flowspec.train.checkpoint import save_atomic\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "try:\n"
        "    save_atomic({'weights': torch.zeros(100_000)}, Path(sys.argv[1]))\n"
        "except OSError as error:\n"
        "    print(error.errno, error.filename)\n"
    )
    path = tmp_path / "last.pt"
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.split() == [str(errno.EFBIG), str(path)], done.stderr
    assert not list(tmp_path.iterdir())  # the partial file is gone


def test_only_torchs_writer_failing_over_an_os_error_is_that_os_error(tmp_path):
    import errno

    from flowspec.errors import naming

    with pytest.raises(OSError) as caught, naming(tmp_path / "last.pt"):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 750656") from None
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "last.pt")
    with pytest.raises(RuntimeError, match="CUDA error"), naming(tmp_path / "last.pt"):
        try:
            raise FileNotFoundError(errno.ENOENT, "No such file")
        except FileNotFoundError:
            raise RuntimeError("CUDA error: an illegal memory access") from None  # a bug, not the disk


def test_atomic_writes_are_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    """A checkpoint's temporary file is fsync'ed whole before it is renamed over the old one; an appended
    metrics row is fsync'ed once written."""
    import os

    from flowspec.train.metrics import METRICS, append_metrics

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", info.st_ino, info.st_size))
        real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("replace", os.stat(src).st_ino, os.fspath(dst)))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / LAST
    save_atomic({"a": torch.ones(1000)}, path)
    written = path.stat()
    assert events == [("fsync", written.st_ino, written.st_size), ("replace", written.st_ino, str(path))]
    events.clear()
    append_metrics(tmp_path, {"step": 1, "train_bpd": 2.5})
    append_metrics(tmp_path, {"step": 2, "train_bpd": 2.4})
    rows = tmp_path / METRICS
    first, after = len(rows.read_text().splitlines(keepends=True)[0]), rows.stat()
    assert events == [("fsync", after.st_ino, first), ("fsync", after.st_ino, after.st_size)]
