"""`flowspec diff A B`: settings that differ, step by step, and the parameter deltas per stage."""

from __future__ import annotations

import re

import pytest
from conftest import SPECS

import flowspec
from flowspec.cli.app import run
from flowspec.formatter import format_spec
from flowspec.inspection import inspect_spec
from flowspec.inspection.diff import _written_at, parameter_deltas, spec_differences
from flowspec.loader import setting_sources

FLOWPP = SPECS / "flowpp_cifar.flow"
UNIFORM = SPECS / "ablations" / "uniform_dequant.flow"


def test_ablation_differences_name_paths_and_sources():
    a, b = flowspec.load_spec(FLOWPP), flowspec.load_spec(UNIFORM)
    diffs = {d.path: d for d in spec_differences(a, b)}
    assert set(diffs) == {
        "model",
        "target_params",
        "dequantize",
        "defaults.coupling.filters",
        "flow.0.body.0.body.2.filters",
        "flow.2.body.0.body.2.filters",
        "flow.3.body.0.body.2.filters",
    }
    assert (diffs["dequantize"].a, diffs["dequantize"].b) == ("variational", "uniform")
    coupling = diffs["flow.2.body.0.body.2.filters"]
    assert (coupling.a, coupling.b, coupling.source_a) == ("96", "104", "flowpp_cifar.flow:23")
    assert spec_differences(a, flowspec.load_spec(FLOWPP)) == []


def test_added_and_removed_steps():
    a = flowspec.load_spec(SPECS / "realnvp_cifar.flow")
    b = flowspec.load_spec(SPECS / "seed_realnvp_cifar.flow")
    diffs = {d.path: d for d in spec_differences(a, b)}
    assert diffs["flow.3"].a == "factor_out" and diffs["flow.3"].b is None
    assert (diffs["flow.0.body.0"].a, diffs["flow.0.body.0"].b) == ("repeat 3", "repeat 8")


def test_differences_are_worded_as_show_writes_them():
    paths = SPECS / "quickstart.flow", SPECS / "seed_realnvp_cifar.flow"
    a, b = map(flowspec.load_spec, paths)
    found = spec_differences(a, b, *map(setting_sources, paths))
    diffs = {d.path: (d.a, d.b) for d in found}
    assert diffs["data.shape"] == ("1x8x8", "3x32x32")
    assert diffs["train.warmup"] == ("20 steps", "0 steps")
    assert diffs["flow.2"] == ("split channel (1 step)", None)
    for spec, side, where in (
        (a, "a", "source_a"),
        (b, "b", "source_b"),
    ):  # what each file wrote, as show does
        written = [
            getattr(d, side) for d in found if getattr(d, where) != "default" and None not in (d.a, d.b)
        ]
        assert len(written) > 15 and all(words in format_spec(spec) for words in written)
    converted = flowspec.load_spec(paths[0], ["data.convert=(size, depth)", "train.warmup=1"])
    diffs = {d.path: (d.a, d.b) for d in spec_differences(a, converted)}
    assert diffs == {"data.convert": ("none", "(size, depth)"), "train.warmup": ("20 steps", "1 step")}


def test_parameter_deltas_per_stage():
    a, b = flowspec.load_spec(FLOWPP), flowspec.load_spec(UNIFORM)
    deltas = {
        s.stage: s for s in parameter_deltas(inspect_spec(a, measure=False), inspect_spec(b, measure=False))
    }
    assert (deltas["total"].a, deltas["total"].b, deltas["total"].delta) == (31_443_440, 32_324_408, 880_968)
    assert deltas["dequantize (all)"].delta == -3_466_976 and deltas["dequantize.context"].b is None
    assert deltas["flow (all)"].delta == 32_324_408 - 27_976_464
    stages = [s for name, s in deltas.items() if name.startswith("flow.")]
    assert sum(s.delta for s in stages) == deltas["flow (all)"].delta
    realnvp = flowspec.load_spec(SPECS / "realnvp_cifar.flow")
    other = parameter_deltas(inspect_spec(a, measure=False), inspect_spec(realnvp, measure=False))
    assert "flow.3 split -> factor_out" in [s.stage for s in other]  # another step there: both kinds named


def test_cli_diff_with_set_and_equal_specs(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    quick = str(SPECS / "quickstart.flow")
    spec = flowspec.load_spec(quick)
    assert run(["diff", quick, "--set", "train.lr=0.0123", "--set", "defaults.coupling.blocks=7"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"train\.lr\s+{spec.train.lr}\s+0\.0123", out)
    # where each side wrote it: the base's defaults line, the second --set
    line = next(i for i, text in enumerate(open(quick), 1) if "coupling mixlogistic(" in text)
    assert re.search(rf"flow\.0\.body\.0\.body\.2\.blocks\s+1\s+7\s+quickstart\.flow:{line} / --set:2", out)
    assert "total" in out and "+" in out
    assert run(["diff", quick, quick]) == 0
    assert "the specs are equal" in capsys.readouterr().out


def test_an_interval_set_by_its_count_or_unit_is_credited_to_the_set():
    """`--set train.length.count=16` writes the interval as `--set train.length=16 steps` does."""
    quick = SPECS / "quickstart.flow"
    sets = ["train.length.count=16", "train.eval.unit=epochs", "train.save=5 steps", "train.save.count=6"]
    b = flowspec.load_spec(quick, sets)
    diffs = spec_differences(
        flowspec.load_spec(quick), b, setting_sources(quick), setting_sources(quick, sets)
    )
    where = {d.path: (d.source_a, d.source_b) for d in diffs}
    line = next(i for i, text in enumerate(open(quick), 1) if "length" in text)
    assert where["train.length"] == (f"quickstart.flow:{line}", "--set:1")
    assert where["train.eval"] == (f"quickstart.flow:{line + 1}", "--set:2")
    assert where["train.save"] == ("default", "--set:4")


def test_settings_that_change_nothing_on_either_side_are_left_out(capsys, monkeypatch):
    """Schedule arguments no schedule of the two runs (a schedule that differs is worded with its own), and
    coupling settings unused on both sides, are left out as `show` leaves them out."""
    imagenet = SPECS / "imagenet64.flow"
    diffs = spec_differences(
        flowspec.load_spec(imagenet), flowspec.load_spec(imagenet, ["train.schedule=cosine"])
    )
    assert [(d.path, d.a, d.b) for d in diffs] == [
        ("train.schedule", "exponential(hold=40000, decay=0.99995, floor=0.0003)", "cosine")
    ]
    sets = ["train.schedule=exponential(hold=5)"]
    diffs = spec_differences(flowspec.load_spec(imagenet), flowspec.load_spec(imagenet, sets))
    assert [(d.path, d.a, d.b) for d in diffs] == [("train.exp_hold", "40000", "5")]
    affine = SPECS / "ablations" / "affine_coupling.flow"
    sets = ["defaults.coupling.components=8"]
    assert spec_differences(flowspec.load_spec(affine), flowspec.load_spec(affine, sets)) == []
    assert run(["diff", str(affine), "--set", sets[0]]) == 0  # held at its built-in value on both sides
    assert "the specs are equal" in capsys.readouterr().out


def test_specs_of_one_file_name_are_told_apart_by_their_folders(tmp_path):
    """Two run folders' `spec.flow`: one `spec.flow:28` for both sides would say both wrote it there."""
    text = (SPECS / "quickstart.flow").read_text()
    for run_dir, length in (("r1", "400 steps"), ("r2", "800 steps")):
        (tmp_path / run_dir).mkdir()
        (tmp_path / run_dir / "spec.flow").write_text(text.replace("400 steps", length))
    a, b = tmp_path / "r1" / "spec.flow", tmp_path / "r2" / "spec.flow"
    line = next(i for i, text in enumerate(open(a), 1) if "length" in text)
    [diff] = spec_differences(
        flowspec.load_spec(a), flowspec.load_spec(b), setting_sources(a), setting_sources(b)
    )
    assert _written_at(diff) == f"r1/spec.flow:{line} / r2/spec.flow:{line}"
    sets = ["train.lr=1"]
    sources = setting_sources(a), setting_sources(a, sets)
    [diff] = spec_differences(flowspec.load_spec(a), flowspec.load_spec(a, sets), *sources)
    assert _written_at(diff) == f"spec.flow:{line - 3} / --set:1"  # one spec.flow: its name alone


def test_cli_diff_bad_spec_exit_2(capsys):
    assert run(["diff", str(FLOWPP), str(SPECS / "missing.flow")]) == 2
    err = capsys.readouterr().err
    assert "missing.flow" in err and "Traceback" not in err


def cli_diff(capsys, monkeypatch, width: int, *argv: str) -> str:
    monkeypatch.setenv("COLUMNS", str(width))
    assert run(["diff", *argv]) == 0
    return capsys.readouterr().out


def test_diff_speaks_the_language(capsys, monkeypatch):
    affine = str(SPECS / "ablations" / "affine_coupling.flow")
    out = cli_diff(capsys, monkeypatch, 200, str(FLOWPP), affine)
    assert re.search(r"defaults\.coupling\s+coupling mixlogistic\s+coupling affine", out)
    assert "defaults.coupling.coupling" not in out and ".coupling.coupling" not in out
    assert re.search(
        r"^model\s+flowpp_cifar\s+flowpp_affine_coupling\s+flowpp_cifar\.flow:3 / affine", out, re.M
    )
    # each side's own line: the base's defaults, the ablation's defaults
    assert re.search(
        r"defaults\.coupling\.filters\s+96\s+108\s+flowpp_cifar\.flow:10 / affine_coupling\.flow:5", out
    )
    quick = str(SPECS / "quickstart.flow")
    sets = [
        "--set",
        "train.ema=off",
        "--set",
        "defaults.coupling.attention=off",
        "--set",
        "train.augment=hflip",
    ]
    out = cli_diff(capsys, monkeypatch, 200, quick, *sets, "--set", "train.length=100 steps")
    assert not re.search(r"\b(True|False|None|Interval)\b", out)
    assert re.search(r"defaults\.coupling\.attention\s+on\s+off\s+default / --set:2", out)
    assert re.search(r"train\.ema\s+0\.99\s+off\s+quickstart\.flow:\d+ / --set:1", out)
    assert re.search(r"train\.augment\s+none\s+hflip", out) and re.search(r"400 steps\s+100 steps", out)
    dogs = str(SPECS / "seed_realnvp_dogs.flow")
    out = cli_diff(capsys, monkeypatch, 200, str(SPECS / "seed_realnvp_cifar.flow"), dogs)
    assert re.search(r"data\.classes\s+all\s+dog\s+default / seed_realnvp_dogs\.flow:\d+", out)


@pytest.mark.parametrize("width", [60, 80, 100, 120])
def test_diff_never_breaks_a_word(capsys, monkeypatch, width):
    a, b = SPECS / "flowpp_cifar.flow", SPECS / "seed_realnvp_dogs.flow"
    out = cli_diff(capsys, monkeypatch, width, str(a), str(b))
    assert max(len(line) for line in out.splitlines()) <= width and "…" not in out
    words = {word.strip("(),") for word in out.split()}
    sources = setting_sources(a), setting_sources(b)
    for d in spec_differences(flowspec.load_spec(a), flowspec.load_spec(b), *sources):
        for text in (d.path, d.a, d.b, d.source_a, d.source_b):
            assert {word.strip("(),") for word in (text or "").split()} <= words, (text, width)


def test_a_class_named_on_one_side_and_numbered_on_the_other_is_no_difference():
    dogs = SPECS / "seed_realnvp_dogs.flow"
    same = spec_differences(flowspec.load_spec(dogs), flowspec.load_spec(dogs, ["data.classes=5"]))
    assert same == []  # CIFAR-10's class 5 is the dog
    other = spec_differences(flowspec.load_spec(dogs), flowspec.load_spec(dogs, ["data.classes=3"]))
    assert [(d.path, d.a, d.b) for d in other] == [("data.classes", "dog", "3")]


def test_specs_whose_classes_differ_only_in_how_they_are_written_are_equal(capsys, monkeypatch):
    """`dog` and `5` are one CIFAR-10 class, used by both sides: the specs are equal, not "differ only in
    settings they do not use"; a resnet coupling's dropout is such a setting."""
    monkeypatch.setenv("COLUMNS", "120")
    dogs = str(SPECS / "seed_realnvp_dogs.flow")
    assert run(["diff", dogs, "--set", "data.classes=5"]) == 0
    assert "the specs are equal" in capsys.readouterr().out
    assert run(["diff", dogs, "--set", "data.classes=5", "--set", "defaults.coupling.dropout=0.3"]) == 0
    assert "the specs differ only in settings they do not use" in capsys.readouterr().out


def test_a_dequantizer_couplings_dropout_is_a_difference():
    """Its dropout is used though a flow coupling of its kind leaves it unused (`unused_settings`)."""
    deq = "dequantize variational { split stripe { coupling affine(network=resnet, dropout=0.3) } sigmoid }"
    text = f"model m\ndata digits {{ shape 1x8x8  levels 17 }}\n{deq}\nflow {{ squeeze }}\n"
    a = flowspec.parse_spec(text)
    b = flowspec.parse_spec(text, overrides=["dequantize.steps.0.body.0.dropout=0.1"])
    assert b.dequantize.steps[0].body[0].dropout == 0.1
    assert [(d.a, d.b) for d in spec_differences(a, b)] == [("0.3", "0.1")]


def test_a_coupling_setting_unused_on_one_side_only_is_a_difference():
    """Mixture components are used by mixlogistic couplings, not by affine ones: a change of coupling kind
    shows what the components were."""
    imagenet = SPECS / "imagenet64.flow"
    a = flowspec.load_spec(imagenet)
    b = flowspec.load_spec(imagenet, ["defaults.coupling.coupling=affine"])
    diffs = {d.path: (d.a, d.b) for d in spec_differences(a, b)}
    assert any(path.endswith("components") for path in diffs), diffs
