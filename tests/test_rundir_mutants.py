"""Tests from a mutation audit of the run folder, the ablation and its plan, exports and atomic writes: each
fails on a plausible bug that every other test passed."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path

import pytest
from train_helpers import tiny_spec, write_flow

import flowspec
from flowspec.cli.app import run
from flowspec.errors import UserError
from flowspec.train import files, rundir
from flowspec.train.ablation_plan import PLAN, Plan
from flowspec.train.distributed import Dist
from flowspec.train.export import export, load_trained
from flowspec.train.lock import LOCK
from flowspec.train.trainer import RunOptions


def test_a_data_file_that_cannot_be_read_is_refused_naming_it(tmp_path, monkeypatch):
    """`regular_file` refuses a file it may not read before a reader opens it (root reads anything: the
    permission is denied by `os.access` itself here)."""
    path = tmp_path / "train.npz"
    path.write_bytes(b"x")
    assert files.regular_file(path) == path
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(UserError, match=f"cannot read data file {path}: permission denied"):
        files.regular_file(path)


class _Noon:
    """`datetime` stopped at noon on 2026-01-02, for run folder names made in the same second."""

    @staticmethod
    def now() -> datetime:
        return datetime(2026, 1, 2, 12, 0, 0)


def test_run_folders_made_in_one_second_are_the_plain_name_then_2_then_3(tmp_path, monkeypatch):
    """The first run folder of a second is `runs/<model>-<date>-<time>` itself; the next ones add `-2`,
    `-3` (never `-1`, never the same folder twice)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir, "datetime", _Noon)
    made = [rundir.choose(tiny_spec(), None, Dist()) for _ in range(3)]
    assert made == [Path("runs") / f"tiny-20260102-120000{end}" for end in ("", "-2", "-3")]
    assert all(folder.is_dir() for folder in made)


def test_an_unstarted_runs_lock_and_saved_bad_batch_are_its_own_and_set_aside(tmp_path):
    """A run that stopped before its first checkpoint may leave its lock file and the batch it saved at a
    non-finite loss: the folder is still an unstarted run's, its files but the lock are moved aside."""
    run_dir = tmp_path / "run"
    rundir.write_spec_files(run_dir, tiny_spec())
    (run_dir / LOCK).write_text("")
    (run_dir / "nonfinite_batch.pt").write_bytes(b"x")
    assert rundir.unstarted(run_dir) == ["nonfinite_batch.pt", "spec.flow", "spec.json"]
    aside = rundir.set_aside(run_dir)
    assert sorted(p.name for p in aside.iterdir()) == ["nonfinite_batch.pt", "spec.flow", "spec.json"]
    assert [p.name for p in run_dir.iterdir()] == [LOCK]


def test_a_folder_holding_only_a_runs_tensorboard_logs_is_refused_for_a_new_run(tmp_path):
    """A new run would write its logs among an earlier run's `tensorboard/` (with no checkpoint to resume)."""
    (tmp_path / "logs" / "tensorboard").mkdir(parents=True)
    with pytest.raises(UserError, match=r"logs already holds tensorboard of an earlier run, with no last.pt"):
        rundir.previous_checkpoint(tmp_path / "logs", tiny_spec(), resume=False)


def test_an_output_inside_a_runs_tensorboard_folder_is_refused(tmp_path):
    """`sample -o RUN/tensorboard/x.png` writes among the run's logs, as `RUN/samples/x.png` among its
    grids: both are refused."""
    run_dir = tmp_path / "run"
    rundir.write_spec_files(run_dir, tiny_spec())
    for folder in ("samples", "tensorboard"):
        target = run_dir / folder / "x.png"
        with pytest.raises(UserError) as refused:
            rundir.check_not_run_file(target, "-o")
        assert str(refused.value) == (
            f"-o {target} would write {target} into {run_dir / folder}, which the run in {run_dir} writes: "
            "choose a file outside it"
        )


def _plan(tmp_path: Path, **options) -> Plan:
    """The plan of an ablation of two tiny specs (files a.flow and b.flow, data folders given) over 2 steps,
    written to and read back from `tmp_path`."""
    specs = [tiny_spec(name=n).model_copy(update={"source": str(tmp_path / f"{n}.flow")}) for n in "ab"]
    data = [tmp_path / "data_a", None]
    how = RunOptions(max_steps=2, **options)
    Plan.make(specs, ["a", "b"], data, how, "2 steps", ["train.lr=1e-3"]).write(tmp_path)
    return Plan.read(tmp_path)


def test_a_resumed_plan_runs_on_the_device_and_threads_given_else_its_own(tmp_path):
    """`ablate --resume --device D --threads N` trains on D with N threads; without them, on the plan's."""
    plan = _plan(tmp_path, device="cpu", threads=2)
    given = plan.run_options(RunOptions(device="cuda:1", threads=3, quiet=True))
    assert (given.device, given.threads, given.quiet, given.max_steps) == ("cuda:1", 3, True, 2)
    kept = plan.run_options(RunOptions())
    assert (kept.device, kept.threads, kept.max_steps) == ("cpu", 2, 2)


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (lambda plan: plan["runs"][0].update(folder="../a"), "runs.0.folder: String should match pattern"),
        (lambda plan: plan["runs"][1].update(folder="a"), "two runs share a folder"),
        (lambda plan: plan["results"].update(c=plan["results"]["a"]), "results of runs not planned: ['c']"),
    ],
)
def test_a_plan_whose_folders_or_results_were_edited_is_refused_as_damaged(tmp_path, edit, said):
    """A run folder outside the ablation's, two runs sharing one, or a result of a run not planned: the
    resume would train or report the wrong runs."""
    from flowspec.train.trainer import RunResult

    plan = _plan(tmp_path)
    plan.record(RunResult(tmp_path / "a", 2, 0.1, "max-steps", 3.0, 2.9, 10.0, 1000))
    plan.write(tmp_path)
    assert Plan.read(tmp_path).results["a"].best_bpd == 2.9
    written = json.loads((tmp_path / PLAN).read_text())
    edit(written)
    (tmp_path / PLAN).write_text(json.dumps(written))
    with pytest.raises(UserError, match="damaged") as refused:
        Plan.read(tmp_path)
    assert said in str(refused.value)


def test_an_ablation_row_is_the_runs_last_and_best_bits_per_dim_last_test_images_and_rate_to_3_digits(
    tmp_path,
):
    """The row's test bits/dim is the last evaluation's, beside the best one; its test images are the last
    evaluation's (an early one measured fewer); its img/s is kept to 3 significant digits."""
    from flowspec.train.ablate import COLUMNS, row_values
    from flowspec.train.trainer import RunResult

    history = [
        {"kind": "train", "step": 1},
        {"kind": "eval", "step": 2, "test_images": 16},
        {"kind": "train", "step": 3},
        {"kind": "eval", "step": 4, "test_images": 64},
        {"kind": "train", "step": 5},
    ]
    result = RunResult(tmp_path / "wide", 5, 0.3, "max-steps", 3.25, 3.125, 1234.5678, 6000, history)
    row = dict(zip(COLUMNS, row_values(result), strict=True))
    assert row == {
        "spec": "wide",
        "parameters": 6000,
        "test bits/dim": 3.25,
        "test images": 64,
        "best bits/dim": 3.125,
        "steps": 5,
        "img/s": 1230.0,
    }


def test_a_finished_runs_folder_gone_at_resume_is_noted(tmp_path):
    """Its row is then the one the plan kept: said, as a run trained on outside the ablation is."""
    from flowspec.train.ablate import _since_finished

    assert _since_finished(tmp_path / "a", 3) == [
        f"{tmp_path / 'a'} is gone: the row of a is the one its plan kept"
    ]
    (tmp_path / "a").mkdir()
    assert _since_finished(tmp_path / "a", 3) == []


def test_an_ablation_out_folder_with_a_last_pt_link_to_nowhere_is_a_runs(tmp_path):
    """A run folder whose last.pt is a dangling link (its checkpoints moved to other disks) is still a run's:
    an ablation there is refused."""
    from flowspec.train.ablate import check_out_folder

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").symlink_to(tmp_path / "nowhere.pt")
    with pytest.raises(UserError, match=r"holds a run \(.*run/last.pt\)"):
        check_out_folder(tmp_path / "run")


def test_an_ablation_whose_runs_end_at_their_length_just_as_the_budget_does_says_nothing_of_it(
    tmp_path, capsys
):
    """`--steps 2` over specs of 2 steps: every run spent its budget, so no note says one ended short of it
    or was trained past it."""
    flow = write_flow(tmp_path / "a.flow", name="a", steps=2, eval_every=2)
    out = tmp_path / "ablation"
    args = ["ablate", str(flow), "--steps", "2", "--out", str(out), "--device", "cpu", "-q"]
    assert run([*args, "--eval-samples", "0"]) == 0
    printed = capsys.readouterr().out
    assert "a " in printed and "note:" not in printed
    assert json.loads((out / "ablation.json").read_text())[0]["steps"] == 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run of 2 steps."""
    from flowspec.train.trainer import train

    out = tmp_path_factory.mktemp("exported") / "run"
    train(
        tiny_spec(steps=2, eval_every=2), RunOptions(out=out, device="cpu", quiet=True, eval={"samples": 0})
    )
    return out


def test_an_export_makes_the_folder_it_is_written_to(trained, tmp_path, capsys):
    """`export -o new/folder/model.safetensors` makes the folders, as `eval -o` and `sample -o` do."""
    exported = tmp_path / "new" / "folder" / "model.safetensors"
    assert run(["export", str(trained), "-o", str(exported)]) == 0
    assert flowspec.load(exported).spec == flowspec.load(trained).spec


def test_an_export_named_in_capitals_is_read_as_an_export(trained, tmp_path, capsys):
    """`export -o MODEL.SAFETENSORS` is accepted, so it is read back as an export, not as a run folder."""
    exported = tmp_path / "MODEL.SAFETENSORS"
    assert run(["export", str(trained), "-o", str(exported)]) == 0
    assert load_trained(exported).step == 2


def test_an_export_gives_back_the_default_data_folder_its_run_read(trained, tmp_path):
    """A CIFAR-10 run given no data folder records the one it read (FLOWSPEC_DATA_DIR or the cache): its
    export keeps it in its metadata, and loading it gives it back."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    exported = tmp_path / "model.safetensors"
    export(trained, exported)
    with safe_open(str(exported), framework="pt") as f:
        metadata = dict(f.metadata())
    assert "data_default" not in metadata and load_trained(exported).data_default is None  # digits: none
    save_file(
        load_file(exported), tmp_path / "cifar.safetensors", metadata={**metadata, "data_default": "/d"}
    )
    assert load_trained(tmp_path / "cifar.safetensors").data_default == "/d"


def _unfinish(out: Path, folder: str) -> None:
    """Make the run `folder` of the ablation in `out` one that stopped before its first checkpoint."""
    plan = json.loads((out / PLAN).read_text())
    del plan["results"][folder]
    (out / PLAN).write_text(json.dumps(plan))
    for name in ("last.pt", "best.pt"):
        (out / folder / name).unlink()


def test_an_ablation_reads_its_data_from_data_and_a_resume_only_that_of_the_runs_left(tmp_path, capsys):
    """`ablate --data DIR` trains every spec on DIR and its plan keeps DIR; a resume reads the data of the
    runs it trains alone (a finished run's may be gone), and `--resume --data MOVED` reads MOVED."""
    from train_helpers import write_shards

    shards = write_shards(tmp_path / "shards", n_train=64, n_test=16)
    specs = []
    for name in "ab":
        flow = write_flow(tmp_path / f"{name}.flow", name=name, steps=1, eval_every=1)
        flow.write_text(flow.read_text().replace("data digits {", "data npz {"))
        specs.append(str(flow))
    out = tmp_path / "ablation"
    args = ["--steps", "1", "--out", str(out), "--device", "cpu", "-q", "--eval-samples", "0"]
    assert run(["ablate", *specs, "--data", str(shards), *args]) == 0
    assert [r["data_dir"] for r in json.loads((out / PLAN).read_text())["runs"]] == [str(shards)] * 2
    _unfinish(out, "b")
    plan = json.loads((out / PLAN).read_text())
    plan["runs"][0]["data_dir"] = str(tmp_path / "gone")  # a's data is no longer there
    (out / PLAN).write_text(json.dumps(plan))
    assert run(["ablate", "--resume", str(out), "-q"]) == 0
    assert set(json.loads((out / PLAN).read_text())["results"]) == {"a", "b"}
    _unfinish(out, "b")
    moved = shards.rename(tmp_path / "moved")
    assert run(["ablate", "--resume", str(out), "--data", str(moved), "-q"]) == 0
    assert [r["data_dir"] for r in json.loads((out / PLAN).read_text())["runs"]] == [str(moved)] * 2
    capsys.readouterr()


def test_a_failed_runs_folder_is_removed_only_when_it_holds_nothing_but_its_lock(tmp_path):
    """A folder with anything else in it is left whole, its lock file too (another run may wait on it)."""
    for held in ([LOCK], [], [LOCK, "metrics.jsonl"], ["notes.txt"]):
        folder = tmp_path / f"run{len(held)}{'-'.join(held)}"
        folder.mkdir()
        for name in held:
            (folder / name).write_text("")
        rundir.remove_if_empty(folder)
        kept = sorted(p.name for p in folder.iterdir()) if folder.exists() else None
        assert kept == (None if set(held) <= {LOCK} else sorted(held)), held


def test_an_older_ablation_whose_rows_had_other_overrides_gets_no_single_command_to_run_again(tmp_path):
    """One command gives every spec the same --set overrides: rows that had different ones are named by
    their models, not turned into a command that would run them otherwise."""
    rows = [
        {"spec": "a", "file": str(tmp_path / "a.flow"), "overrides": ["train.lr=1e-3"]},
        {"spec": "b", "file": str(tmp_path / "b.flow"), "overrides": []},
    ]
    (tmp_path / "ablation.json").write_text(json.dumps(rows))
    with pytest.raises(UserError) as refused:
        Plan.read(tmp_path)
    said = str(refused.value)
    assert "again with the spec files it compared (a, b) and its options" in said and "--set" not in said


def test_a_data_file_rewritten_at_the_same_size_is_prepared_again(tmp_path, cache_in_tmp):
    """A prepared cache is keyed by its files' sizes and modification times: new images of the same shape
    (the same number of bytes) are read anew, not taken from the cache of the old ones."""
    import numpy as np

    from flowspec.spec import DataSpec
    from flowspec.train.data import load_split

    images = tmp_path / "x.npy"
    np.save(images, np.zeros((40, 8, 8), np.uint8))
    data = DataSpec(dataset="npy", path=str(images), shape=(1, 8, 8), levels=17, test_split=8)
    assert int(load_split(data, "train").images.max()) == 0
    size = images.stat().st_size
    np.save(images, np.full((40, 8, 8), 5, np.uint8))
    os.utime(images, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert images.stat().st_size == size
    assert int(load_split(data, "train").images.max()) == 5


def test_an_ablation_into_an_older_ablations_folder_or_a_live_ones_is_refused_before_it_trains(
    tmp_path, monkeypatch, capsys
):
    """An older flowspec's ablation (its ablation.json, no plan) is never overwritten; one going on in
    another process is named as such, not offered to be finished with --resume."""
    from train_helpers import ELSEWHERE, held_by_another_process

    from flowspec.train import ablate

    monkeypatch.setattr(ablate, "train", lambda *_, **__: pytest.fail("trained into another ablation"))
    flow = str(write_flow(tmp_path / "a.flow", name="a"))
    old, live = tmp_path / "old", tmp_path / "live"
    old.mkdir()
    (old / "ablation.json").write_text("[]")
    assert run(["ablate", flow, "--steps", "1", "--out", str(old), "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{old} already holds an ablation ({old / 'ablation.json'})" in err and "--resume" not in err
    assert (old / "ablation.json").read_text() == "[]" and [p.name for p in old.iterdir()] == [
        "ablation.json"
    ]
    with held_by_another_process(live):
        (live / PLAN).write_text("{}")
        assert run(["ablate", flow, "--steps", "1", "--out", str(live), "--device", "cpu", "-q"]) == 2
        err = capsys.readouterr().err
        assert f"run folder {live} is in use by {ELSEWHERE}" in err and "--resume" not in err
