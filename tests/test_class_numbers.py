"""A number in a `folder` dataset's `classes`, in a checkpoint or export from before a run recorded its data:
an older flowspec read it as a position among the subfolders, this one as the subfolder it names."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import TINY_FLOW

from flowspec.cli.app import run
from flowspec.spec import DataSpec
from flowspec.train.checkpoint import CHECKSUM, LAST, load_checkpoint, save_atomic
from flowspec.train.class_numbers import (
    EXPORT_RECORDED,
    RECORDED,
    ambiguous,
    check_class_numbers,
    folder_classes,
    names_numbers,
    readings,
    written_reading_names,
)

pytestmark = pytest.mark.usefixtures("cache_in_tmp")


def _numbered_folder(root, names=("1", "2", "3")):
    """Grey 8x8 PNGs in subfolders named by numbers, each class of its own brightness."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(40):
            pixels = np.clip(rng.normal(40 + 80 * c, 6 + 20 * c, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / name / f"{i}.png")
    return root


def _numbers_flow(tmp_path, classes: str, steps: int = 4):
    data = _numbered_folder(tmp_path / "numbers")
    flow = tmp_path / "numbers.flow"
    text = TINY_FLOW.format(name="numbers", filters=4, steps=steps, eval_every=2)
    text = text.replace("init_batch 64", "init_batch 8")  # not in the data path: /tmp/.../pytest-2364/
    data_line = (
        f'data folder {{ path "{data}"  shape 1x8x8  levels 256  classes {classes}  test_split 0.25 }}'
    )
    flow.write_text(text.replace("data digits { shape 1x8x8  levels 17 }", data_line))
    return flow


def _old_style_run(tmp_path, trained: str = "2", number: int = 1):
    """A run of an older flowspec on `classes 1` of subfolders 1/ 2/ 3/, which it read as 2/: trained on
    2/ here, its spec says `classes 1` and its last.pt lacks `data_fingerprints`, as every checkpoint written
    before runs recorded their data does (or on subfolder `trained`, said as `number`). Also the test
    bits/dim of the subfolder trained on at its last step."""
    flow = _numbers_flow(tmp_path, f'"{trained}"')
    out = tmp_path / "run"
    args = ["train", str(flow), "--out", str(out), "--device", "cpu", "--threads", "1", "--quiet"]
    assert run([*args, "--max-steps", "2", "--eval-samples", "0"]) == 0
    assert run(["eval", str(out), "--device", "cpu", "--out", str(tmp_path / "own.json")]) == 0
    payload = load_checkpoint(out)
    assert RECORDED in payload
    spec = json.loads(payload["spec"])
    spec["data"]["classes"] = [number]
    del spec["train"]["tf_eps"]  # a setting every spec has held since numbers are names
    text = json.dumps(spec)
    old = {key: value for key, value in payload.items() if key not in (RECORDED, CHECKSUM)}
    old.update(spec=text, spec_hash=hashlib.sha256(text.encode()).hexdigest())
    save_atomic(old, out / LAST)
    (out / "spec.json").write_text(json.dumps(spec, indent=2))
    (out / "spec.flow").write_text(flow.read_text().replace(f'classes "{trained}"', f"classes {number}"))
    return out, json.loads((tmp_path / "own.json").read_text())["bpd"]


def test_the_readings_differ_where_a_number_names_another_subfolder_than_its_position(tmp_path):
    numbered = DataSpec(dataset="folder", path="x", shape=(1, 8, 8), classes=(1,))
    assert readings((1,), ("1", "2", "3")) == {"positions": ("2",), "names": ("1",)}  # 2/ then, 1/ now
    assert readings((1,), ("0", "1", "2")) == {"positions": ("1",), "names": ("1",)}  # the same either way
    assert readings((1,), ("1", "cat", "dog"))["names"] == ("1",)  # a number that names a subfolder: that one
    assert readings((1,), ("cat", "dog"))["names"] == ("dog",)  # no number names a subfolder: a position
    assert readings(("dog", 0), ("cat", "dog")) == {"positions": ("dog", "cat"), "names": ("dog", "cat")}
    # only a reading that selects subfolders there are
    assert readings((3,), ("1", "2", "3")) == {"names": ("3",)}  # no position 3
    assert readings((0,), ("1", "2", "3")) == {"positions": ("1",)}  # no 0/
    assert readings((0, 7), ("1", "2", "3")) == readings(("nope",), ("1", "2")) == {}
    (tmp_path / "train" / "1").mkdir(parents=True)
    (tmp_path / "train" / "2").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / ".hidden").mkdir()
    assert folder_classes(tmp_path) == ("1", "2")  # a folder split into train/ and test/
    assert not ambiguous(numbered, True, tmp_path)  # a file that records how its run read them
    assert ambiguous(numbered, False, tmp_path) and not ambiguous(numbered, False, tmp_path / "gone")


def test_the_same_subfolders_in_another_order_are_the_same_classes(tmp_path):
    """Classes select images: the order they are given in changes nothing read. Subfolders 0/ to 10/ sort
    10/ before 2/, so `classes (2, ..., 10)` selects 10/, 2/, ..., 9/ read as positions and 2/, ..., 10/
    read as names: the same subfolders, which were refused as ambiguous, and named in another order than
    a reading lists them they were refused on resume as another spec."""
    eleven, three = tmp_path / "eleven", tmp_path / "three"
    for folder, count in ((eleven, 11), (three, 3)):
        for name in range(count):
            (folder / str(name + (folder == three))).mkdir(parents=True)
    numbers = tuple(range(2, 11))
    old = DataSpec(dataset="folder", path=str(eleven), shape=(1, 8, 8), classes=numbers)
    found = readings(numbers, folder_classes(eleven))
    assert found["positions"] != found["names"] and set(found["positions"]) == set(found["names"])
    assert not ambiguous(old, False, eleven)
    assert check_class_numbers(old, False, eleven, eleven / "last.pt") == old  # read as it trained
    for named in (found["names"], found["positions"], tuple(reversed(found["names"]))):
        assert names_numbers(old, old.model_copy(update={"classes": named}), eleven)
    assert not names_numbers(old, old.model_copy(update={"classes": found["names"][1:]}), eleven)
    # 1/ 2/ 3/: `classes (1, 2)` is 2/ 3/ as positions, 1/ 2/ as names; either named in any order
    one_two = DataSpec(dataset="folder", path=str(three), shape=(1, 8, 8), classes=(1, 2))
    for named, selects in ((("2", "1"), True), (("3", "2"), True), (("3", "1"), False)):
        assert names_numbers(one_two, one_two.model_copy(update={"classes": named}), three) == selects


def test_an_old_checkpoint_with_numbered_classes_is_refused_until_they_are_named(tmp_path, capsys):
    out, bpd = _old_style_run(tmp_path)
    capsys.readouterr()
    evaluate = ["eval", str(out), "--device", "cpu", "--threads", "1"]
    assert run([*evaluate, "--out", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert f"{out / LAST} was written before flowspec recorded the data a run read" in err
    assert "(subfolders 1/, 2/, 3/)" in err and "Traceback" not in err
    assert """--set 'data.classes="2"' for positions or --set 'data.classes="1"' for names""" in err
    assert not (tmp_path / "e.json").exists()
    assert run([*evaluate, "--set", 'data.classes="2"', "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["bpd"] == bpd  # what the run trained on
    # an export of it does not say how its run read them either
    assert run(["export", str(out), "-o", str(tmp_path / "m.safetensors")]) == 0
    assert (
        run(["eval", str(tmp_path / "m.safetensors"), "--device", "cpu", "--out", str(tmp_path / "x.json")])
        == 2
    )
    assert "m.safetensors was written before flowspec recorded" in capsys.readouterr().err
    # a resume reads the data too: refused, then the classes named take the place of the numbers
    resume = ["train", "--resume", str(out), "--max-steps", "3", "--device", "cpu", "--threads", "1", "-q"]
    assert run(resume) == 2
    assert "for positions or" in capsys.readouterr().err
    for other in ('"3"', '"nope"', '("2", "3")'):  # the subfolders of neither reading: refused
        assert run([*resume, "--set", f"data.classes={other}"]) == 2
        assert "a resume may change only" in capsys.readouterr().err
    assert load_checkpoint(out)["step"] == 2
    assert run([*resume, "--set", 'data.classes="2"']) == 0
    assert json.loads((out / "spec.json").read_text())["data"]["classes"] == ["2"]
    payload = load_checkpoint(out)
    assert payload["step"] == 3 and RECORDED in payload
    assert run([*resume[:3], "--max-steps", "4", *resume[5:]]) == 0  # named and recorded now
    assert run([*resume, "--set", "data.classes=0"]) == 2  # other classes than those named: refused
    assert "a resume may change only" in capsys.readouterr().err


def test_a_checkpoint_that_records_its_data_reads_numbers_as_names(tmp_path, capsys):
    flow = _numbers_flow(tmp_path, "1", steps=2)
    out = tmp_path / "run"
    args = ["train", str(flow), "--out", str(out), "--device", "cpu", "--threads", "1", "--quiet"]
    assert run([*args, "--eval-samples", "0"]) == 0
    assert run(["export", str(out), "-o", str(tmp_path / "m.safetensors")]) == 0
    for target in (out, tmp_path / "m.safetensors"):
        assert run(["eval", str(target), "--device", "cpu", "--out", str(tmp_path / "e.json")]) == 0
    assert "was written before" not in capsys.readouterr().err
    assert torch.load(out / LAST, weights_only=False)[RECORDED]


def test_a_file_an_export_from_after_numbers_became_names_but_before_it_recorded_so_reads_them_as_names(
    tmp_path, capsys
):
    """An export of a flowspec that read numbers as names before exports recorded it (one of commit dc09e37:
    no data_recorded) is told apart by its spec's tf_eps, which every spec has held since a little after
    numbers became names; its precision is no proof (checkpoints recorded theirs before)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    flow = _numbers_flow(tmp_path, "1", steps=2)
    out = tmp_path / "run"
    args = ["train", str(flow), "--out", str(out), "--device", "cpu", "--threads", "1", "--quiet"]
    assert run([*args, "--eval-samples", "0"]) == 0
    assert run(["eval", str(out), "--device", "cpu", "--out", str(tmp_path / "own.json")]) == 0
    bpd = json.loads((tmp_path / "own.json").read_text())["bpd"]
    model = tmp_path / "m.safetensors"
    assert run(["export", str(out), "-o", str(model)]) == 0
    with safe_open(str(model), framework="pt") as f:
        metadata = f.metadata()
    assert "tf_eps" in json.loads(metadata["spec"])["train"] and "precision" in metadata
    del metadata[EXPORT_RECORDED]  # as dc09e37 wrote it
    save_file(load_file(str(model)), str(model), metadata=metadata)
    capsys.readouterr()
    assert run(["eval", str(model), "--device", "cpu", "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["bpd"] == bpd  # 1/, as the run read
    assert "was written before" not in capsys.readouterr().err
    # without tf_eps (older than it) the spec cannot tell, and nor can an export's precision
    spec = json.loads(metadata["spec"])
    assert written_reading_names(metadata["spec"]) and not written_reading_names("not json")
    del spec["train"]["tf_eps"]
    assert not written_reading_names(json.dumps(spec))
    text = json.dumps(spec)
    metadata.update(spec=text, spec_hash=hashlib.sha256(text.encode()).hexdigest())
    save_file(load_file(str(model)), str(model), metadata=metadata)
    assert run(["eval", str(model), "--device", "cpu", "--out", str(tmp_path / "x.json")]) == 2
    assert "m.safetensors was written before flowspec recorded" in capsys.readouterr().err


@pytest.mark.parametrize("moved", [False, True], ids=["in place", "moved, read with --data"])
@pytest.mark.parametrize("saves", ["nothing to train", "crash before a checkpoint"])
def test_a_resume_that_names_the_classes_and_saves_no_checkpoint_leaves_a_run_that_resumes(
    tmp_path, monkeypatch, capsys, saves, moved
):
    """Its spec.json names the classes, its last.pt has the numbers still: the run is the same, and a plain
    resume takes the classes named. The names are those of the folder read: `--data`'s, for data moved
    since the run (the folder its checkpoint names has none)."""
    from flowspec.train.trainer import Trainer

    out, _ = _old_style_run(tmp_path)
    resume = ["train", "--resume", str(out), "--device", "cpu", "--threads", "1", "-q", "--log-every", "1"]
    if moved:
        shutil.move(tmp_path / "numbers", tmp_path / "moved")
        resume += ["--data", str(tmp_path / "moved")]
    named = ["--set", 'data.classes="2"']
    if saves == "nothing to train":
        assert run([*resume, "--max-steps", "2", *named]) == 0  # at step 2 already
    else:

        def crash(self, *args, **kwargs):
            raise RuntimeError("a crash before the first checkpoint")

        monkeypatch.setattr(Trainer, "_save", crash)
        assert run([*resume, "--max-steps", "3", *named]) == 1
        assert "a crash before the first checkpoint" in capsys.readouterr().err
        monkeypatch.undo()
    assert json.loads((out / "spec.json").read_text())["data"]["classes"] == ["2"]
    assert load_checkpoint(out)["step"] == 2 and RECORDED not in load_checkpoint(out)
    capsys.readouterr()
    assert run([*resume, "--max-steps", "3"]) == 0
    assert "does not belong" not in capsys.readouterr().err
    payload = load_checkpoint(out)
    assert payload["step"] == 3 and RECORDED in payload
    assert json.loads(payload["spec"])["data"]["classes"] == ["2"]
    assert run([*resume, "--max-steps", "4", *named]) == 0  # named again: the same


@pytest.mark.parametrize("trained, number", [("3", 3), ("1", 0)])
def test_numbers_that_only_one_reading_selects_subfolders_by_are_read_so(tmp_path, capsys, trained, number):
    """`classes 3` on 1/ 2/ 3/ (no position 3) can only mean 3/, `classes 0` (no 0/) only 1/: evaluated
    and resumed without a word, the run named by the subfolders it trained on."""
    out, bpd = _old_style_run(tmp_path, trained, number)
    capsys.readouterr()
    evaluate = ["eval", str(out), "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "e.json")]
    assert run(evaluate) == 0
    assert json.loads((tmp_path / "e.json").read_text())["bpd"] == bpd
    resume = ["train", "--resume", str(out), "--device", "cpu", "--threads", "1", "-q"]
    assert run([*resume, "--max-steps", "3"]) == 0
    assert "was written before" not in capsys.readouterr().err
    payload = load_checkpoint(out)
    assert payload["step"] == 3 and RECORDED in payload
    classes = [trained] if number == 0 else [number]  # a number read as a name stays a number
    assert json.loads(payload["spec"])["data"]["classes"] == classes
    assert json.loads((out / "spec.json").read_text())["data"]["classes"] == classes
    assert run([*resume, "--max-steps", "4"]) == 0


def test_numbers_that_no_reading_selects_subfolders_by_are_refused_naming_the_subfolders(tmp_path, capsys):
    out, _ = _old_style_run(tmp_path, "3", 5)
    capsys.readouterr()
    evaluate = ["eval", str(out), "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "e.json")]
    assert run(evaluate) == 2
    err = capsys.readouterr().err
    assert "its `classes 5` on" in err and "(subfolders 1/, 2/, 3/) select no subfolders there are" in err
    assert "Traceback" not in err and not (tmp_path / "e.json").exists()
