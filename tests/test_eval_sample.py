"""`flowspec eval`, `sample` and `ablate` on trained checkpoints; the importance-weighted bound."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from train_helpers import tiny_spec, write_flow

import flowspec
from flowspec.cli.app import run
from flowspec.errors import UserError
from flowspec.spec import DataSpec
from flowspec.train.checkpoint import load_checkpoint
from flowspec.train.data import load_split
from flowspec.train.evaluate import bounds, iw_log_prob
from flowspec.train.trainer import RunOptions, RunResult, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_spec(steps=4), RunOptions(out=out, device="cpu", quiet=True))
    return out


def test_eval_writes_both_bounds(run_dir, capsys):
    assert run(["eval", str(run_dir), "--iw", "4", "--limit", "24", "--batch", "32", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "importance weighted, K=4" in printed and "single sample" in printed
    record = json.loads((run_dir / "eval_test_first24_iw4.json").read_text())
    assert record["images"] == 24 and record["step"] == 4 and record["split"] == "test"
    assert 0.5 < record["bpd"] < math.log2(17) + 1
    assert record["iw4_bpd"] < record["bpd"] + 0.05  # a tighter bound, up to noise
    model = flowspec.load(run_dir, device="cpu")  # the EMA weights, the seed's streams, the first 24 images
    images = load_split(model.spec.data, "test").images[:24]
    direct = bounds(model, images, 4, 32, torch.device("cpu"), seed=0)
    assert (record["bpd"], record["iw4_bpd"]) == (direct["bpd"], direct["iw4_bpd"])


def test_eval_of_a_checkpoint_file_to_a_chosen_json(run_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    args = ["eval", str(run_dir / "best.pt"), "--split", "train", "--limit", "16", "--out", str(out)]
    assert run([*args, "--device", "cpu"]) == 0
    record = json.loads(out.read_text())
    assert record["split"] == "train" and record["iw_samples"] == 1 and not any("iw1" in k for k in record)


def test_eval_set_changes_the_data_of_a_trained_model(run_dir, tmp_path, capsys):
    out = tmp_path / "threes.json"
    args = ["eval", str(run_dir), "--set", "data.classes=3", "--out", str(out), "--device", "cpu"]
    assert run(args) == 0
    threes = json.loads(out.read_text())["images"]
    assert 0 < threes < 297 / 5  # one digit class of the 297 test images


def test_an_eval_of_some_classes_gets_its_own_file_saying_what_it_measured(run_dir, capsys):
    assert run(["eval", str(run_dir), "--set", "data.classes=3", "--limit", "8", "--device", "cpu"]) == 0
    record = json.loads((run_dir / "eval_test_3_first8.json").read_text())
    assert record["overrides"] == ["data.classes=3"] and record["data"]["classes"] == [3]
    assert not (run_dir / "eval_test.json").exists()  # the whole test split's file is another
    assert run(["eval", str(run_dir / "best.pt"), "--limit", "8", "--device", "cpu"]) == 0
    record = json.loads((run_dir / "eval_test_first8_best.json").read_text())
    assert (record["batch"], record["limit"], record["device"]) == (256, 8, "cpu")  # eval's default batch
    assert record["versions"]["flowspec"] == flowspec.__version__ and len(record["trained_spec_hash"]) == 64
    assert run(["eval", str(run_dir / "best.pt"), "--limit", "8", "--seed", "3", "--device", "cpu"]) == 0
    assert (run_dir / "eval_test_first8_seed3_best.json").is_file()
    assert json.loads((run_dir / "eval_test_first8_best.json").read_text())["checkpoint"] == str(
        run_dir / "best.pt"
    )


def test_an_eval_file_name_names_few_plain_classes_and_counts_others():
    from flowspec.cli.inference import _classes_suffix

    def named(*classes):
        data = DataSpec.model_construct(classes=classes or None)  # names of any dataset
        return _classes_suffix(tiny_spec().model_copy(update={"data": data}))

    assert (named(), named("dog"), named(3, 5)) == ("", "_dog", "_cat-dog")  # CIFAR-10 indices by their names
    assert named(5, 3) == named("dog", 3) == named("dog", "cat") == "_cat-dog"  # any order, one file

    def folder(*classes):
        data = DataSpec.model_construct(dataset="folder", classes=classes)
        return _classes_suffix(tiny_spec().model_copy(update={"data": data}))

    assert folder("b", 10, "a", 2) == folder(2, "a", 10, "b") == "_2-10-a-b"  # numbers by value, then names
    assert named("T-shirt/top", "Trouser") == "_2_classes" and named(*range(100, 200)) == "_100_classes"
    assert named("a" * 40) == "_" + "a" * 40 and named("a" * 41) == "_1_classes"  # up to 40 characters


def test_a_sample_grid_is_named_by_its_model_and_says_its_seed(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(["sample", str(run_dir), "-n", "4", "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    seed = int(re.search(r"seed (\d+)\)", said).group(1))
    [grid] = tmp_path.glob(f"samples_tiny_step*_t1.0_seed{seed}.png")  # another seed's replaces none
    again = tmp_path / "again.png"
    assert (
        run(["sample", str(run_dir), "-n", "4", "--device", "cpu", "--seed", str(seed), "-o", str(again)])
        == 0
    )
    assert grid.read_bytes() == again.read_bytes()


def test_set_model_renames_what_eval_and_sample_report_whatever_the_name(run_dir, tmp_path, capsys):
    for name in ("stored", "on"):  # "stored" was the stored spec's placeholder name, taken as no rename
        args = ["--device", "cpu", "--set", f"model={name}"]
        grid, out = tmp_path / f"{name}.png", str(tmp_path / f"{name}.json")
        assert run(["sample", str(run_dir), "-n", "4", "-o", str(grid), *args]) == 0
        assert f"wrote 4 samples of {name}" in capsys.readouterr().out
        assert run(["eval", str(run_dir), "--limit", "4", "-o", out, *args]) == 0
        assert capsys.readouterr().out.startswith(f"{name}, step")


def test_set_that_would_change_the_trained_model_is_refused(run_dir, tmp_path, capsys):
    grid = tmp_path / "g.png"
    args = ["sample", str(run_dir), "-n", "4", "-o", str(grid), "--set", "flow.0.body.0.count=3"]
    assert run(args) == 2
    assert "would change the model stored in" in capsys.readouterr().err
    assert not grid.exists()
    for setting in ("eval.images=10", "train.lr=1e-3", "target_params=5"):  # eval reads none of them
        assert run(["eval", str(run_dir), "--set", setting, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"--set {setting}: eval reads only the data settings" in err and "--images" in err


def test_set_that_the_trained_model_cannot_take_is_refused_as_a_change_not_blamed_on_it(run_dir, capsys):
    for command, setting in (
        ("eval", "data.shape=1x7x7"),
        ("eval", "flow.0.mask=channel"),
        ("sample", "data.shape=1x7x7"),
    ):
        assert run([command, str(run_dir), "--set", setting, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"--set {setting} would change the model stored in" in err and "stored spec" not in err
    args = [
        "eval",
        str(run_dir),
        "--set",
        "data.classes=99",
        "--set",
        "flow.0.mask=channel",
        "--device",
        "cpu",
    ]
    assert run(args) == 2  # a mistake of a data setting is its own
    assert "class index 99 is out of range" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "sample"])
@pytest.mark.parametrize("override", ["=1", "noequals", " = 3"])
def test_a_set_that_does_not_read_key_equals_value_is_refused_as_show_refuses_it(
    run_dir, capsys, command, override
):
    assert run([command, str(run_dir), "--set", override, "--set", "model=x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: --set:1:1: an override must read KEY=VALUE, e.g. defaults.coupling.filters=64"
    )
    assert "would change nothing" not in err and "Traceback" not in err


class _Stub(torch.nn.Module):
    """log_prob of an image is minus its pixel sum, and 1 less on every other row of a call: an image's
    samples differ, and samples of one image counted for another would show."""

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return -x.flatten(1).double().sum(1) - torch.arange(len(x), dtype=torch.float64) % 2


def test_importance_weighted_bound_is_logmeanexp():
    x = torch.arange(3, dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 2, 2).contiguous()  # sums 0, 4, 8
    got = iw_log_prob(_Stub(), x, k=4, batch=6)  # two calls of 2 samples per image, in image order
    offsets = torch.logsumexp(-torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64), 0) - math.log(4)
    expected = -torch.tensor([0.0, 4.0, 8.0], dtype=torch.float64) + offsets
    torch.testing.assert_close(got, expected)
    result = bounds(_Stub(), x, k=4, batch=8, device=torch.device("cpu"))
    assert result["iw4_bpd"] == pytest.approx(-expected.mean().item() / (4 * math.log(2)))


class _NoisyStub(torch.nn.Module):
    """log_prob with Gaussian noise drawn per image element, as the variational dequantizer draws it."""

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn_like(x, dtype=torch.float32).flatten(1).sum(1).double() - 100.0


def test_the_single_sample_bound_is_the_same_whatever_k(run_dir):
    """Its noise comes from the seed's stream, `batch` images at a time; the importance samples draw from
    a stream of their own. 3 x 5 x 5 images: on the CPU, Gaussian draws split at other element counts
    (not multiples of 16) give other values, so the chunks must not depend on k."""
    cpu = torch.device("cpu")
    images = torch.zeros(12, 3, 5, 5, dtype=torch.uint8)
    plain = bounds(_NoisyStub(), images, 1, 8, cpu, seed=3)["bpd"]
    assert all(bounds(_NoisyStub(), images, k, 8, cpu, seed=3)["bpd"] == plain for k in (2, 4, 8))
    assert bounds(_NoisyStub(), images, 1, 8, cpu, seed=4)["bpd"] != plain
    model = flowspec.load(run_dir, device="cpu")  # a trained model: the bounds and their streams
    digits = load_split(model.spec.data, "test").images[:12]
    plain = bounds(model, digits, 1, 12, cpu, seed=3)["bpd"]
    for k in (2, 4):
        both = bounds(model, digits, k, 12, cpu, seed=3)
        assert both["bpd"] == plain and both[f"iw{k}_bpd"] < plain + 0.05
    assert bounds(model, digits, 4, 12, cpu, seed=3) == bounds(model, digits, 4, 12, cpu, seed=3)


def test_sample_grid_uses_the_seed(run_dir, tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for path in (a, b):
        argv = ["sample", str(run_dir), "-n", "16", "--temperature", "0.9", "-o", str(path), "--seed", "3"]
        assert run([*argv, "--device", "cpu"]) == 0
    assert "wrote 16 samples of tiny (step 4, T=0.9, seed 3)" in capsys.readouterr().out
    assert Image.open(a).size == (4 * 66 + 2, 4 * 66 + 2)  # 4 x 4 grid of 8 x 8 images enlarged 8 times
    assert a.read_bytes() == b.read_bytes()


def test_ablate_compares_specs(tmp_path, capsys):
    small = write_flow(tmp_path / "small.flow", name="small", filters=4)
    wide = write_flow(tmp_path / "wide.flow", name="wide", filters=8)
    out = tmp_path / "ablation"
    assert (
        run(["ablate", str(small), str(wide), "--steps", "3", "--out", str(out), "--device", "cpu", "-q"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "small" in printed and "wide" in printed and "test bits/dim" in printed
    rows = json.loads((out / "ablation.json").read_text())
    assert [r["spec"] for r in rows] == ["small", "wide"] and all(r["steps"] == 3 for r in rows)
    assert rows[0]["parameters"] < rows[1]["parameters"]
    assert (out / "curves.png").is_file() and (out / "small" / "last.pt").is_file()


def test_ablate_trains_with_trains_speed_and_memory_options(tmp_path, capsys):
    """An ablation of the paper's runs at bf16 with activations recomputed, as `train` would."""
    small = write_flow(tmp_path / "small.flow", name="small", filters=4)
    out = tmp_path / "ablation"
    args = ["--precision", "bf16", "--recompute", "on", "--data-memory", "1G", "--device", "cpu", "-q"]
    assert run(["ablate", str(small), "--steps", "2", "--out", str(out), *args]) == 0
    payload = load_checkpoint(out / "small")
    assert payload["precision"] == "bf16" and payload["step"] == 2


def test_ablate_streams_with_data_memory_0_and_refuses_too_many_threads_before_writing(tmp_path, capsys):
    """`--data-memory 0` streams, as in `train`; `--threads` above the cores is refused before the plan is
    written (a run refusing it would leave a half-made ablation that only --resume could finish)."""
    small = write_flow(tmp_path / "small.flow", name="small", filters=4)
    out = tmp_path / "ablation"
    args = ["ablate", str(small), "--steps", "1", "--out", str(out), "--device", "cpu", "-q"]
    assert run([*args, "--threads", str((os.cpu_count() or 1) + 1)]) == 2
    assert "this machine has" in capsys.readouterr().err and not out.exists()
    assert run([*args, "--data-memory", "0"]) == 0
    assert json.loads((out / "ablation.json").read_text())[0]["steps"] == 1


def test_ablate_tells_apart_copies_of_one_model_by_their_files(tmp_path, capsys, monkeypatch):
    """The natural ablation copies a spec and changes one line, keeping its model name: the runs are
    named by their files, whole even in a narrow terminal, and ablation.json says which file and
    --set made each."""
    monkeypatch.setenv("COLUMNS", "80")
    base = write_flow(tmp_path / "base_copy_of_the_quickstart.flow", name="quickstart_ablation", filters=4)
    wide = write_flow(tmp_path / "wider_copy_of_the_quickstart.flow", name="quickstart_ablation", filters=8)
    out = tmp_path / "ablation"
    args = ["ablate", str(base), str(wide), "--steps", "1", "--out", str(out), "--device", "cpu", "-q"]
    assert run([*args, "--set", "train.seed=3"]) == 0
    names = [
        "quickstart_ablation-base_copy_of_the_quickstart",
        "quickstart_ablation-wider_copy_of_the_quickstart",
    ]
    table = capsys.readouterr().out
    spec_column = "".join(line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│"))
    assert "…" not in table and all(name in spec_column for name in names)  # folded, not cut
    rows = json.loads((out / "ablation.json").read_text())
    assert [(r["spec"], r["file"], r["overrides"]) for r in rows] == [
        (names[0], str(base), ["train.seed=3"]),
        (names[1], str(wide), ["train.seed=3"]),
    ]


def test_ablate_with_a_tiny_budget_prints_the_table(tmp_path, capsys):
    small = write_flow(tmp_path / "small.flow", name="small", filters=4)
    out = tmp_path / "ablation"
    args = ["ablate", str(small), str(small), "--budget", "0.01s", "--out", str(out), "--device", "cpu", "-q"]
    assert run(args) == 0
    printed = capsys.readouterr().out
    assert re.search(r"small-0 .*\d+\.\d{4} .* 1 .*\d", printed) and "small-1" in printed
    rows = json.loads((out / "ablation.json").read_text())
    assert [r["steps"] for r in rows] == [1, 1] and all(r["img/s"] > 0 for r in rows)


def test_ablate_refuses_steps_beyond_a_specs_length_before_anything_trains(tmp_path, monkeypatch, capsys):
    """`--steps 30` with a spec of length 20 said "30 steps each" over a run of 20 steps."""
    from flowspec.train import ablate

    long = write_flow(tmp_path / "long.flow", name="long", steps=6)
    short = write_flow(tmp_path / "short.flow", name="short", steps=3)
    epoch = tmp_path / "epoch.flow"  # 1 epoch of the 1,500 digits' training images at batch 16: 93 steps
    epoch.write_text(long.read_text().replace("length 6 steps", "length 1 epochs").replace("long", "epoch"))
    monkeypatch.setattr(ablate, "train", lambda *_, **__: pytest.fail("trained before the check"))
    out = tmp_path / "ablation"
    args = ["ablate", str(long), str(short), "--steps", "4", "--out", str(out), "--device", "cpu", "-q"]
    assert run(args) == 2
    err = capsys.readouterr().err
    assert f"--steps 4 is beyond the training length of {short} (3 steps): its run would stop" in err
    assert "give --steps 3 or fewer, or lengthen every spec with --set 'train.length=4 steps'" in err
    assert str(long) not in err and not out.exists()
    assert run(["ablate", str(epoch), str(short), "--steps", "100", "--out", str(out)]) == 2
    assert f"of {epoch} (1 epoch: 93 steps), {short} (3 steps): their runs" in capsys.readouterr().err


def test_ablate_notes_a_run_that_ended_at_its_length_before_the_budget(tmp_path, capsys):
    """A `--budget` longer than a spec's training: the run ends at its length, said after the table (and
    again when the finished ablation is resumed)."""
    short = write_flow(tmp_path / "short.flow", name="short", steps=2)
    out = tmp_path / "ablation"
    args = ["ablate", str(short), "--budget", "1h", "--out", str(out), "--device", "cpu", "-q"]
    assert run([*args, "--eval-samples", "0"]) == 0
    note = "note: short ended at its spec's length (step 2) before its budget (1h) was spent"
    assert note in capsys.readouterr().out
    assert run(["ablate", "--resume", str(out)]) == 0
    assert note in capsys.readouterr().out


def test_ablate_reads_every_specs_data_before_training(tmp_path, monkeypatch, capsys):
    from flowspec.train import ablate, distributed

    good = write_flow(tmp_path / "good.flow", name="good")
    bad = tmp_path / "bad.flow"
    bad.write_text(good.read_text().replace("data digits {", 'data npy { path "missing.npy"'))
    monkeypatch.setattr(ablate, "train", lambda *_, **__: pytest.fail("trained before the data was read"))
    out = tmp_path / "ablation"
    assert run(["ablate", str(good), str(bad), "--steps", "1", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: ") and "missing.npy" in err
    assert not out.exists()
    big = tmp_path / "big.flow"  # a batch the data cannot fill: found before the good spec trains too
    big.write_text('extends "good.flow"\nmodel big\ntrain { batch 4000  init_batch 16 }\n')
    assert run(["ablate", str(good), str(big), "--steps", "1", "--out", str(out), "--device", "cpu"]) == 2
    assert f"error: {big}: the training set has" in capsys.readouterr().err and not out.exists()
    odd = tmp_path / "odd.flow"  # under torchrun, a batch its processes cannot share: found before too
    odd.write_text('extends "good.flow"\nmodel odd\ntrain { batch 33 }\n')
    torchrun = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}
    for name, value in torchrun.items():  # as rank 0 of two
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "setup", lambda device: (distributed.Dist(), None))  # no job to join
    assert run(["ablate", str(good), str(odd), "--steps", "1", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"error: {odd}: the batch (33) must be divisible by the number of processes (2)" in err
    assert not out.exists()


def test_ablate_shares_the_data_of_specs_that_read_the_same(tmp_path, monkeypatch):
    from flowspec.train import ablate

    reads, given = [], []
    sets = {"train": "train" * 20, "test": "test" * 20}  # stand-ins, each longer than a batch
    monkeypatch.setattr(
        ablate, "load_split", lambda data, split, data_dir: reads.append(split) or sets[split]
    )

    def fake_train(spec, options, train_set, test_set, keep_group):
        given.append((train_set, test_set))
        return RunResult(options.out, 5, 0.1, "finished", 3.0, 3.0, 1.0, 100, [])

    monkeypatch.setattr(ablate, "train", fake_train)
    spec = tiny_spec()
    other = spec.model_copy(update={"name": "b", "data": spec.data.model_copy(update={"classes": (1, 2)})})
    ablate.run_ablation([spec, spec, other], RunOptions(max_steps=5), tmp_path, seed=0)
    assert reads == ["train", "test", "train", "test"] and given == [(sets["train"], sets["test"])] * 3
    for budget in ({"max_time": 3.0}, {}, {"max_steps": 2, "max_run_time": 3.0}):  # one, kept in its plan
        with pytest.raises(ValueError, match="budget is one of max_steps and max_run_time"):
            ablate.run_ablation([spec], RunOptions(**budget), tmp_path / "other", seed=0)


def test_ablate_stops_at_a_signal_and_compares_the_finished_runs(tmp_path, monkeypatch):
    from flowspec.train import ablate

    trained = []

    def fake_train(spec, options, train_set, test_set, keep_group):
        trained.append(options.out)
        stopped = "SIGINT" if len(trained) == 2 else "finished"
        return RunResult(options.out, 5, 0.1, stopped, 3.0, 3.0, 0.0312, 100, [])

    monkeypatch.setattr(ablate, "train", fake_train)
    spec = tiny_spec()
    specs = [spec.model_copy(update={"name": n}) for n in ("a", "b", "c")]
    results = ablate.run_ablation(specs, RunOptions(max_steps=5), tmp_path, seed=0).runs
    assert [r.run_dir.name for r in results] == ["a", "b"] and len(trained) == 2
    rows = json.loads((tmp_path / "ablation.json").read_text())  # the finished runs: "b" was stopped
    assert [r["spec"] for r in rows] == ["a"] and [r["img/s"] for r in rows] == [0.0312]  # a slow rate kept
    assert ablate.fmt_rate(0.0312) == "0.0312" and ablate.fmt_rate(45.67) == "45.7"
    assert ablate.fmt_rate(1234.5) == "1,234"


def test_eval_and_sample_with_compile_fuse_the_chains_and_give_the_same_bounds(
    run_dir, tmp_path, capsys, monkeypatch
):
    """On a CPU, --compile compiles the networks' elementwise chains (here with dynamo's aot_eager
    backend, which runs the traced graphs without generating code) and says so in the header."""
    import flowspec

    fuse = flowspec.FlowModel.fuse_elementwise
    monkeypatch.setattr(
        flowspec.FlowModel, "fuse_elementwise", lambda self, b="inductor": fuse(self, "aot_eager")
    )
    bpd = {}
    for flags in ([], ["--compile"]):
        out = tmp_path / f"eval{len(flags)}.json"
        assert run(["eval", str(run_dir), "--limit", "24", "--device", "cpu", "-o", str(out), *flags]) == 0
        bpd[bool(flags)] = json.loads(out.read_text())["bpd"]
        assert ("compiled (elementwise)" in capsys.readouterr().out) == bool(flags)
    assert bpd[True] == pytest.approx(bpd[False], rel=1e-6)
    grid = tmp_path / "g.png"
    assert run(["sample", str(run_dir), "-n", "4", "-o", str(grid), "--device", "cpu", "--compile"]) == 0
    assert "compiled (elementwise)" in capsys.readouterr().out and grid.exists()


def test_ablate_says_when_runs_were_evaluated_on_different_numbers_of_test_images(tmp_path, capsys):
    """One spec reaches its evaluation interval (every test image), the other stops before it (a short
    run's 64): the table shows each run's count and a note says how to evaluate them alike."""
    early = write_flow(tmp_path / "early.flow", name="early", steps=100, eval_every=2)
    late = write_flow(tmp_path / "late.flow", name="late", steps=100, eval_every=50)
    out = tmp_path / "ablation"
    args = ["ablate", str(early), str(late), "--steps", "2", "--out", str(out), "--device", "cpu", "-q"]
    assert run([*args, "--eval-samples", "0"]) == 0
    printed = capsys.readouterr().out
    rows = {r["spec"]: r["test images"] for r in json.loads((out / "ablation.json").read_text())}
    assert rows == {"early": 297, "late": 64} and re.search(r"early .* 297 ", printed)
    assert "different numbers of test images (64, 297)" in printed and "--eval-images N" in printed
    assert run([*args, "--eval-samples", "0", "--eval-images", "100", "--out", str(tmp_path / "same")]) == 0
    printed = capsys.readouterr().out
    assert "test bits/dim on 100 test images" in printed and "different numbers" not in printed


def test_a_failed_ablation_run_is_reported_and_the_others_still_train(tmp_path, monkeypatch, capsys):
    from flowspec.train import ablate

    def fake_train(spec, options, train_set, test_set, keep_group):
        if spec.name == "b":
            raise UserError("training stopped: 5 steps in a row had a non-finite loss")
        options.out.mkdir(parents=True)
        return RunResult(options.out, 5, 0.1, "finished", 3.0, 3.0, 1.0, 100, [])

    monkeypatch.setattr(ablate, "train", fake_train)
    for name in ("a", "b", "c"):
        write_flow(tmp_path / f"{name}.flow", name=name)
    out = tmp_path / "ablation"
    specs = [str(tmp_path / f"{name}.flow") for name in ("a", "b", "c")]
    assert run(["ablate", *specs, "--steps", "1", "--out", str(out), "--device", "cpu", "-q"]) == 2
    captured = capsys.readouterr()
    assert "error: the run of b failed: training stopped: 5 steps in a row" in captured.err
    assert re.search(r"\ba .*\n.*\bc ", captured.out)
    rows = json.loads((out / "ablation.json").read_text())
    assert [r["spec"] for r in rows] == ["a", "c", "b"] and "non-finite" in rows[2]["error"]


def test_ablation_run_folders_are_unique():
    from flowspec.train.ablate import folder_names

    assert folder_names(["a", "b"]) == ["a", "b"]
    assert folder_names(["a", "a", "b"]) == ["a-0", "a-1", "b"]
    assert folder_names(["a", "a", "a-1"]) == ["0-a", "1-a", "2-a-1"]
    assert folder_names(["a", "a", "b"], ["x/one.flow", "y/two.flow", None]) == ["a-one", "a-two", "b"]
    assert folder_names(["a", "a"], ["x/one.flow", "y/one.flow"]) == ["a-0", "a-1"]


def test_an_ablation_never_overwrites_an_earlier_one(tmp_path, monkeypatch, capsys):
    """Every run folder (and the ablation's own file) is checked before anything trains; when every run
    fails, ablation.json still records why."""
    from flowspec.train import ablate

    def failing(spec, options, train_set, test_set, keep_group):
        raise UserError(f"{spec.name} diverged")

    monkeypatch.setattr(ablate, "train", failing)
    specs = [str(write_flow(tmp_path / f"{name}.flow", name=name)) for name in ("a", "b")]
    out = tmp_path / "ablation"
    assert run(["ablate", *specs, "--steps", "1", "--out", str(out), "--device", "cpu", "-q"]) == 2
    assert [r["error"] for r in json.loads((out / "ablation.json").read_text())] == [
        "a diverged",
        "b diverged",
    ]
    monkeypatch.setattr(ablate, "train", lambda *_, **__: pytest.fail("trained into an earlier ablation"))
    assert run(["ablate", *specs, "--steps", "1", "--out", str(out), "--device", "cpu"]) == 2
    assert "already holds an ablation" in capsys.readouterr().err
    (out / "ablation.json").unlink()
    assert run(["ablate", *specs, "--steps", "1", "--out", str(out), "--device", "cpu"]) == 2
    assert f"finish it with: flowspec ablate --resume {out}" in capsys.readouterr().err  # its plan is there
    (out / "ablation-plan.json").unlink()
    (out / "b").mkdir()
    (out / "b" / "last.pt").write_bytes(b"")  # a run there (even a failed one's folder)
    assert run(["ablate", *specs, "--steps", "1", "--out", str(out), "--device", "cpu"]) == 2
    assert f"{out / 'b'} already holds a run" in capsys.readouterr().err


def test_a_new_run_is_refused_inside_a_run_folder_or_in_a_folder_of_runs_before_anything_is_written(
    run_dir, tmp_path, capsys
):
    """As for an ablation: a run inside another's folder (its samples/, tensorboard/x, also through a link)
    would write its files among that run's, and `--out runs` for `--out runs/NAME` would turn the folder of
    runs into a run (whose curves.png and samples/ sit among them); both are refused and leave the folders
    as they were (no lock file, no folder made)."""
    flow = write_flow(tmp_path / "a.flow", name="a")
    (tmp_path / "link").symlink_to(run_dir)
    before = {p: p.read_bytes() if p.is_file() else None for p in run_dir.parent.rglob("*")}
    inside = f"lies inside the run folder {run_dir} (it holds {run_dir / 'last.pt'}): a run writes its files"
    cases = {
        run_dir / "samples": inside,
        run_dir / "tensorboard" / "x": inside,
        tmp_path / "link" / "samples": inside,
        run_dir.parent: f"{run_dir.parent} holds the run folder run: a run writes its files into a folder of "
        f"its own, not among other runs; choose another --out, e.g. {run_dir.parent / 'NAME'}",
    }
    for out, message in cases.items():
        assert run(["train", str(flow), "--out", str(out), "--max-steps", "1", "--device", "cpu", "-q"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {out} ") and message in err
    assert {p: p.read_bytes() if p.is_file() else None for p in run_dir.parent.rglob("*")} == before


def test_an_ablation_is_refused_in_a_run_folder_or_inside_one_before_anything_is_written(
    run_dir, tmp_path, monkeypatch, capsys
):
    """Its curves.png would replace the run's, and its runs and table would be written among the run's
    files; its grids' and logs' folders (made or not), and a link to the run, are refused alike."""
    from flowspec.train import ablate

    monkeypatch.setattr(ablate, "train", lambda *_, **__: pytest.fail("trained into a run folder"))
    flow = write_flow(tmp_path / "a.flow", name="a")
    (tmp_path / "link").symlink_to(run_dir)
    before = {p: p.read_bytes() if p.is_file() else None for p in run_dir.rglob("*")}
    cases = {
        run_dir: f"--out {run_dir} holds a run ({run_dir / 'last.pt'})",
        tmp_path / "link": f"--out {tmp_path / 'link'} holds a run ({run_dir / 'last.pt'})",
        run_dir / "samples": f"--out {run_dir / 'samples'} lies inside the run folder {run_dir} (it holds",
        run_dir
        / "tensorboard"
        / "x": f"lies inside the run folder {run_dir} (it holds {run_dir / 'last.pt'})",
    }
    for out, message in cases.items():
        assert run(["ablate", str(flow), "--steps", "2", "--out", str(out), "--device", "cpu", "-q"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.rstrip().endswith(
            "choose another --out" + ", outside it" * ("lies" in message)
        )
    assert {p: p.read_bytes() if p.is_file() else None for p in run_dir.rglob("*")} == before
    far = tmp_path / "project"  # an unstarted run's spec.json three levels up is no run of this folder's
    (far / "a" / "b").mkdir(parents=True)
    (far / "spec.json").write_text((run_dir / "spec.json").read_text())
    ablate.check_out_folder(far / "a" / "b" / "c")
    with pytest.raises(
        UserError, match=f"lies inside the run folder {far} \\(it holds {far / 'spec.json'}\\)"
    ):
        ablate.check_out_folder(far / "a" / "b")
    (far / "spec.json").write_text('{"openapi": "3.0"}')  # another tool's spec.json marks no run
    ablate.check_out_folder(far / "a" / "b")
    ablate.check_out_folder(far)
    (far / "metrics.jsonl").write_text("")  # ... unless beside a run's metrics (a run's, damaged)
    with pytest.raises(UserError, match="holds a run"):
        ablate.check_out_folder(far)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(
        UserError, match=f"--out {tmp_path / 'dangling'} is a link to {tmp_path / 'nowhere'}, "
    ):
        ablate.check_out_folder(tmp_path / "dangling")


def test_an_export_remembers_the_data_its_run_trained_on(tmp_path, capsys):
    """`eval` of an export reads the data folder the run was given, as `eval` of its run folder does,
    and says which data it evaluates."""
    from train_helpers import write_shards

    from flowspec.train.export import load_trained

    shards = write_shards(tmp_path / "shards")
    spec = tiny_spec(steps=2, data=DataSpec(dataset="npz", shape=(1, 8, 8), levels=17))
    train(spec, RunOptions(out=tmp_path / "run", data_dir=shards, device="cpu", quiet=True))
    exported = tmp_path / "model.safetensors"
    assert run(["export", str(tmp_path / "run"), "-o", str(exported)]) == 0
    assert load_trained(exported).data_dir == str(shards.resolve())
    assert load_trained(exported).train_images == load_trained(tmp_path / "run").train_images == 256
    assert (
        run(["eval", str(exported), "--images", "8", "--device", "cpu", "-o", str(tmp_path / "e.json")]) == 0
    )
    assert f"the test split of {shards}" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["source"].startswith(str(shards))
    moved = shards.rename(tmp_path / "moved")
    args = ["eval", str(exported), "--images", "8", "--device", "cpu", "-o", str(tmp_path / "e.json")]
    assert run([*args, "--set", f'data.path="{moved}"']) == 0  # --set data.path wins over the recorded one
    assert f"the test split of {moved}" in capsys.readouterr().out
    assert run(args) == 2
    assert f"note: the run's data folder {shards.resolve()} is gone" in capsys.readouterr().out


def test_eval_says_when_a_test_split_is_held_out_of_other_images_than_the_run_trained_on(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    images = tmp_path / "x.npy"
    np.save(images, rng.integers(0, 17, (120, 8, 8), dtype=np.uint8))
    data = DataSpec(dataset="npy", path=str(images), shape=(1, 8, 8), levels=17, test_split=20)
    train(tiny_spec(steps=2, data=data), RunOptions(out=tmp_path / "run", device="cpu", quiet=True))
    args = ["eval", str(tmp_path / "run"), "--images", "8", "--device", "cpu", "-o", str(tmp_path / "e.json")]
    assert run(args) == 0
    assert "note:" not in capsys.readouterr().out
    np.save(images, rng.integers(0, 17, (130, 8, 8), dtype=np.uint8))  # ten images added
    assert run(args) == 0
    said = capsys.readouterr().out
    assert "note: the data has 110 training images now and had 100 when the run trained" in said


def test_default_exports_of_last_and_best_are_two_files_and_outputs_make_their_folder(run_dir, tmp_path):
    from safetensors import safe_open

    assert run(["export", str(run_dir)]) == 0 and run(["export", str(run_dir / "best.pt")]) == 0
    with safe_open(str(run_dir / "model_best.safetensors"), "pt") as f:
        assert f.metadata()["checkpoint"] == str((run_dir / "best.pt").resolve())
    assert (run_dir / "model.safetensors").is_file()
    out = tmp_path / "new" / "folder" / "e.json"  # made before the work, not after it
    assert (
        run(["eval", str(run_dir), "--limit", "4", "--device", "cpu", "-o", str(out)]) == 0 and out.is_file()
    )
    (tmp_path / "file").write_text("")
    assert run(["eval", str(run_dir), "--limit", "4", "-o", str(tmp_path / "file" / "e.json")]) == 2


def test_eval_on_other_data_gets_its_own_file_and_records_the_checkpoints_own_hash(run_dir, tmp_path):
    from flowspec.train.checkpoint import load_checkpoint

    assert run(["eval", str(run_dir), "--limit", "4", "--set", "data.levels=17", "--device", "cpu"]) == 0
    assert (run_dir / "eval_test_first4.json").is_file()  # the run's own data, said again: the same file
    assert run(["eval", str(run_dir), "--limit", "4", "--set", "data.convert=size", "--device", "cpu"]) == 0
    [other] = run_dir.glob("eval_test_data*_first4.json")  # data read otherwise: another file
    record = json.loads(other.read_text())
    assert record["trained_spec_hash"] == load_checkpoint(run_dir)["spec_hash"]
    assert record["overrides"] == ["data.convert=size"]
    exported = tmp_path / "m.safetensors"  # an export keeps the checkpoint's spec text and hash
    assert run(["export", str(run_dir), "-o", str(exported)]) == 0
    assert (
        run(["eval", str(exported), "--limit", "4", "--device", "cpu", "-o", str(tmp_path / "e.json")]) == 0
    )
    assert json.loads((tmp_path / "e.json").read_text())["trained_spec_hash"] == record["trained_spec_hash"]


def test_eval_sample_and_export_are_refused_under_a_torchrun_job_of_several_processes(
    run_dir, tmp_path, monkeypatch, capsys
):
    """Each process ran them whole: eval printed everything twice, sample drew two grids with seeds of their
    own into one file (rank 0's printed seed did not reproduce it), export wrote twice."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for command, out in (("eval", "e.json"), ("sample", "s.png"), ("export", "m.safetensors")):
        assert run([command, str(run_dir), "-o", str(tmp_path / out)]) == 2
        assert capsys.readouterr().err == (
            f"error (rank 1): {command} runs in one process: run it without torchrun (each of this job's 2 "
            "processes would run it whole and write the same file)\n"
        )
        assert not (tmp_path / out).exists()


def test_a_command_that_fails_makes_no_output_folder(run_dir, tmp_path):
    out = tmp_path / "new" / "e.json"
    assert run(["eval", str(tmp_path / "no_run"), "-o", str(out)]) == 2
    assert (
        run(["sample", str(run_dir), "--set", "data.classes=3", "-o", str(tmp_path / "new" / "g.png")]) == 2
    )
    assert not (tmp_path / "new").exists()
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")  # a link to nothing: no folder can be made there
    assert run(["eval", str(run_dir), "-o", str(tmp_path / "dangling" / "e.json")]) == 2


def test_a_run_records_the_folder_its_relative_data_path_named(tmp_path, monkeypatch, capsys):
    """A spec's relative `path` is read from the working directory: the run records where that was, so an
    eval (or resume) from elsewhere reads the run's own data, not another folder of that name."""
    from train_helpers import write_shards

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    own = write_shards(tmp_path / "a" / "shards")
    write_shards(tmp_path / "b" / "shards")
    spec = tiny_spec(steps=2, data=DataSpec(dataset="npz", path="shards", shape=(1, 8, 8), levels=17))
    monkeypatch.chdir(tmp_path / "a")
    train(spec, RunOptions(out=tmp_path / "run", device="cpu", quiet=True))
    monkeypatch.chdir(tmp_path / "b")
    capsys.readouterr()
    assert run(["eval", str(tmp_path / "run"), "--limit", "4", "--device", "cpu"]) == 0
    assert f"the test split of {own.resolve()}" in capsys.readouterr().out
    assert (tmp_path / "run" / "eval_test_first4.json").is_file()  # the run's own data: no _data part


def test_a_cifar_run_reads_flowspec_data_dir_where_it_runs_and_records_what_it_read(
    tmp_path, monkeypatch, capsys
):
    """cifar10 without a path reads FLOWSPEC_DATA_DIR, which says where the data is on the machine of the
    moment: an eval or resume under another one reads that (a resume after the first folder is gone too),
    and eval names it as other data than the run's own (recorded)."""
    from train_helpers import write_shards

    own, other = write_shards(tmp_path / "own"), write_shards(tmp_path / "other")  # named as cifar10's
    monkeypatch.setenv("FLOWSPEC_DATA_DIR", str(own))
    spec = tiny_spec(steps=4, data=DataSpec(dataset="cifar10", shape=(1, 8, 8), levels=17))
    train(spec, RunOptions(out=tmp_path / "run", device="cpu", quiet=True, max_steps=2))
    assert run(["eval", str(tmp_path / "run"), "--limit", "4", "--device", "cpu"]) == 0
    assert (tmp_path / "run" / "eval_test_first4.json").is_file()  # the run's own data: no _data part
    monkeypatch.setenv("FLOWSPEC_DATA_DIR", str(other))
    capsys.readouterr()
    assert run(["eval", str(tmp_path / "run"), "--limit", "4", "--device", "cpu"]) == 0
    assert str(other.resolve()) in capsys.readouterr().out
    [elsewhere] = (tmp_path / "run").glob("eval_test_data*_first4.json")
    assert json.loads(elsewhere.read_text())["data_folder"] == str(other.resolve())
    shutil.rmtree(own)
    resumed = train(spec, RunOptions(out=tmp_path / "run", device="cpu", quiet=True, resume=True))
    assert resumed.step == 4


def test_eval_where_flowspec_data_dir_is_unset_reads_the_folder_the_run_read(tmp_path, monkeypatch, capsys):
    """A cifar10 run trained through FLOWSPEC_DATA_DIR, evaluated (or its export) where the variable is unset
    or empty: it reads the folder the run read, saying so, not the cache (which it would download into)."""
    from train_helpers import write_shards

    own = write_shards(tmp_path / "own")  # named as cifar10's
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FLOWSPEC_OFFLINE", "1")
    monkeypatch.setenv("FLOWSPEC_DATA_DIR", str(own))
    spec = tiny_spec(steps=2, data=DataSpec(dataset="cifar10", shape=(1, 8, 8), levels=17))
    train(spec, RunOptions(out=tmp_path / "run", device="cpu", quiet=True))
    assert run(["export", str(tmp_path / "run"), "-o", str(tmp_path / "m.safetensors")]) == 0

    cheap = ["--limit", "4", "--device", "cpu"]

    def reads_own(target: Path) -> None:
        capsys.readouterr()
        assert run(["eval", str(target), *cheap, "-o", str(tmp_path / "e.json")]) == 0
        assert f"FLOWSPEC_DATA_DIR is unset here: reading {own.resolve()}" in capsys.readouterr().out
        assert json.loads((tmp_path / "e.json").read_text())["data_folder"] == str(own.resolve())

    monkeypatch.setenv("FLOWSPEC_DATA_DIR", "")  # empty: as unset
    reads_own(tmp_path / "run")
    monkeypatch.delenv("FLOWSPEC_DATA_DIR")
    reads_own(tmp_path / "run")
    reads_own(tmp_path / "m.safetensors")
    assert run(["eval", str(tmp_path / "run"), *cheap]) == 0
    assert (tmp_path / "run" / "eval_test_first4.json").is_file()  # the run's own data: no _data part
    assert not (tmp_path / "cache" / "flowspec").exists()  # nothing looked for there


def test_eval_of_another_dataset_does_not_read_the_runs_folder(tmp_path, capsys):
    """A run on npz shards, evaluated on scikit-learn's digits (same shape and levels): the recorded folder
    is the shards', which digits must not be handed (it reads no files)."""
    from train_helpers import write_shards

    shards = write_shards(tmp_path / "shards")
    spec = tiny_spec(steps=2, data=DataSpec(dataset="npz", shape=(1, 8, 8), levels=17))
    train(spec, RunOptions(out=tmp_path / "run", data_dir=shards, device="cpu", quiet=True))
    args = ["eval", str(tmp_path / "run"), "--set", "data.dataset=digits"]  # not "drop --data SHARDS"
    assert run([*args, "--limit", "4", "--device", "cpu"]) == 0
    assert "scikit-learn's bundled digits" in capsys.readouterr().out


def test_one_process_at_a_time_carries_out_an_ablation(tmp_path, monkeypatch, capsys):
    """A second ablation into a folder where one goes on in another process (or a resume of it) is
    refused, naming the holder, before it trains or writes anything."""
    from train_helpers import ELSEWHERE, held_by_another_process

    from flowspec.train import ablate

    spec = str(write_flow(tmp_path / "a.flow", name="a"))
    out = tmp_path / "ablation"
    monkeypatch.setattr(ablate, "train", lambda *_, **__: pytest.fail("trained beside a live ablation"))
    with held_by_another_process(out):
        for args in ([spec, "--steps", "1", "--out", str(out)], ["--resume", str(out)]):
            assert run(["ablate", *args, "--device", "cpu", "-q"]) == 2
            err = capsys.readouterr().err
            assert f"run folder {out} is in use by {ELSEWHERE}" in err
            assert ("choose another --out folder" in err) == ("--out" in args)  # not for --resume
    assert [p.name for p in out.iterdir()] == [".lock"]


def test_sample_at_a_temperature_that_overflows_writes_nothing_and_says_so(run_dir, tmp_path, capsys):
    grid = tmp_path / "g.png"
    assert (
        run(["sample", str(run_dir), "-n", "4", "--temperature", "1e30", "-o", str(grid), "--device", "cpu"])
        == 2
    )
    err = capsys.readouterr().err
    assert "sampling at temperature 1e+30 gave values that are not finite: nothing was written" in err
    assert not grid.exists()


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "run"
    train(tiny_spec(steps=2, eval_every=2), RunOptions(out=out, device="cpu", quiet=True, precision="bf16"))
    return out


def test_eval_of_a_bf16_run_computes_in_bf16_and_repeats_its_test_bpd(bf16_run, capsys):
    """`eval --seed 1 --batch B` repeats the run's own (bf16) evaluation exactly; `--precision fp32` measures
    something else, says so, and writes a file of its own."""
    [*_, row] = (json.loads(line) for line in (bf16_run / "metrics.jsonl").read_text().splitlines())
    args = ["eval", str(bf16_run), "--seed", "1", "--batch", "16", "--device", "cpu"]
    assert run(args) == 0
    record = json.loads((bf16_run / "eval_test_seed1.json").read_text())
    assert record["bpd"] == row["test_bpd"] and record["precision"] == "bf16"
    assert "precision bf16 (the run's)" in capsys.readouterr().out
    assert run([*args, "--precision", "fp32"]) == 0
    assert "precision fp32 (the run trained in bf16)" in capsys.readouterr().out
    fp32 = json.loads((bf16_run / "eval_test_seed1_fp32.json").read_text())
    assert fp32["precision"] == "fp32" and fp32["bpd"] != record["bpd"]
    assert fp32["bpd"] == pytest.approx(record["bpd"], abs=0.01)
    assert json.loads((bf16_run / "eval_test_seed1.json").read_text()) == record  # not replaced
    autocast = {c.autocast_dtype for c in flowspec.load(bf16_run).couplings()}
    assert autocast == {torch.bfloat16}  # the Python API computes in the run's precision too
    assert {c.autocast_dtype for c in flowspec.load(bf16_run, precision="fp32").couplings()} == {None}


def test_an_export_keeps_the_precision_its_run_trained_in(bf16_run, tmp_path, capsys):
    """An export records the run's precision, which eval of it uses; one without it (older) computes in
    fp32."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    exported = tmp_path / "model.safetensors"
    assert run(["export", str(bf16_run), "-o", str(exported)]) == 0
    args = ["--limit", "32", "--device", "cpu"]
    assert run(["eval", str(bf16_run), *args, "-o", str(tmp_path / "run.json")]) == 0
    assert run(["eval", str(exported), *args, "-o", str(tmp_path / "export.json")]) == 0
    record = json.loads((tmp_path / "export.json").read_text())
    assert (
        record["precision"] == "bf16"
        and record["bpd"] == json.loads((tmp_path / "run.json").read_text())["bpd"]
    )
    with safe_open(str(exported), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "precision"}
    save_file(load_file(exported), tmp_path / "old.safetensors", metadata=metadata)
    capsys.readouterr()
    assert run(["eval", str(tmp_path / "old.safetensors"), *args]) == 0
    assert "precision fp32 (its file records none)" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval_test_first32_old.json").read_text())["precision"] == "fp32"


def test_sample_in_another_precision_is_seeded_and_named_apart(run_dir, tmp_path, capsys, monkeypatch):
    """`sample --precision bf16` of an fp32 run draws the same grid for a seed, to a file of its own;
    `auto` resolves as `train` does."""
    from flowspec.train import precision

    monkeypatch.chdir(tmp_path)
    args = ["sample", str(run_dir), "-n", "4", "--seed", "5", "--device", "cpu", "--precision", "bf16"]
    assert run(args) == 0
    assert "precision bf16 (the run trained in fp32)" in capsys.readouterr().out
    [grid] = tmp_path.glob("samples_tiny_step*_t1.0_seed5_bf16.png")
    monkeypatch.setattr(precision, "native_bf16", lambda device: "CPU AVX512 with avx512_bf16")
    assert run([*args[:-1], "auto", "-o", str(tmp_path / "auto.png")]) == 0
    assert (
        "precision bf16 (auto: CPU AVX512 with avx512_bf16; the run trained in fp32)"
        in capsys.readouterr().out
    )
    assert (tmp_path / "auto.png").read_bytes() == grid.read_bytes()
    assert run([*args[:-2], "-o", str(tmp_path / "fp32.png")]) == 0
    assert "precision fp32 (the run's)" in capsys.readouterr().out


def test_the_ablation_table_shows_whole_spec_names_in_80_columns(tmp_path, monkeypatch, capsys):
    """The official ablations' names were cut mid-word at 80 columns (`flowpp_cif` / `ar`): the names tell
    the runs apart. One count of test images is said by the caption alone, which leaves them room."""
    from flowspec.cli.training import _print_ablation
    from flowspec.train import ablate

    names = ["flowpp_cifar", "flowpp_affine_coupling", "flowpp_uniform_dequant", "flowpp_no_attention"]
    rows = [(name, 31_443_440, 3.4567, 10_000, 3.4567, 2, 1.23) for name in names]
    monkeypatch.setattr(ablate, "row_values", lambda row: row)
    monkeypatch.setattr(ablate, "test_images", lambda row: row[3])
    monkeypatch.setenv("COLUMNS", "80")
    _print_ablation(rows, "2 steps each", tmp_path)
    printed = capsys.readouterr().out
    assert all(re.search(rf"│ {name} +│ 31,443,440 │", printed) for name in names)
    table = [line for line in printed.splitlines() if line[:1] in "┏┃┡│└"]
    assert max(map(len, table)) <= 80 and "test bits/dim on 10000 test images" in printed
    assert "img/s ┃" in printed  # no column cropped


def test_an_export_records_its_runs_step_and_evaluation_weights(run_dir, tmp_path):
    """The export's metadata keeps the training step (found by mutation testing: a step written as 0 passed),
    and its tensors are the run's evaluation weights."""
    from flowspec.train.export import export, load_trained

    exported = tmp_path / "m.safetensors"
    export(run_dir, exported)
    loaded, original = load_trained(exported), load_trained(run_dir)
    assert loaded.step == original.step == 4
    weights = original.model.state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in loaded.model.state_dict().items())
