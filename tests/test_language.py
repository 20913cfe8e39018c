"""The language: shipped specs, round trips, extends, defaults, `--set` overrides, and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import ALL_SPECS, ROOT, SPECS

from flowspec import FlowSpec, load_spec, parse_spec
from flowspec.cli.app import run
from flowspec.diagnostics import SpecError
from flowspec.formatter import format_spec
from flowspec.loader import setting_sources
from flowspec.resolve import OVERRIDE_FILE
from flowspec.shapes import shape_issues
from flowspec.steps import KINDS, written
from flowspec.steps.coupling import CouplingStep, held_at_builtin
from flowspec.validation_errors import error_message

IDS = [str(p.relative_to(SPECS)) for p in ALL_SPECS]


def steps_of(spec: FlowSpec, kind: str, where: str = "flow") -> list:
    steps = spec.flow if where == "flow" else spec.dequantize.steps
    return [step for _, step in written(steps) if step.kind == kind]


def all_couplings(spec: FlowSpec) -> list[CouplingStep]:
    deq = steps_of(spec, "coupling", "dequantize") if spec.dequantize.kind == "variational" else []
    return steps_of(spec, "coupling") + deq


# ---------------------------------------------------------------- shipped specs


def test_all_shipped_specs_are_found():
    names = {p.name for p in ALL_SPECS}
    assert {"flowpp_cifar.flow", "quickstart.flow", "realnvp_cifar.flow", "affine_coupling.flow"} <= names
    assert {"imagenet32.flow", "imagenet64_5bit.flow", "celeba64_3bit.flow", "celeba128_5bit.flow"} <= names
    assert len(ALL_SPECS) == 14


@pytest.mark.parametrize("path", ALL_SPECS, ids=IDS)
def test_shipped_spec_round_trips_through_flow_and_json(path: Path):
    spec = load_spec(path)
    assert spec.source == str(path)
    text = format_spec(spec)
    assert "extends" not in text
    assert parse_spec(text) == spec
    assert FlowSpec.model_validate_json(spec.model_dump_json(indent=2)) == spec
    assert format_spec(parse_spec(text)) == text  # canonical: formatting is a fixed point


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.accumulate=2", "train.weight_decay=1e-4", "train.eps=1e-7", "train.clip_grad_norm=off"],
        ["train.schedule=exponential(hold=5, decay=0.99, floor=1e-5)", "train.ema=off"],
        ["train.augment=hflip"],
        ["train.schedule=step(every=7, gamma=0.3)", "train.save=3 steps", "train.init_batch=32"],
        ["train.length=100 steps", "train.rewarm=warmup(at=50, steps=10, lr=1e-5)", "train.seed=9"],
        ["eval.images=16", "eval.batch=8", "eval.samples=0", "eval.temperatures=(0.7)", "eval.inversion=off"],
        ["data.classes=(3, 5)", "preprocess.alpha=0.01", "defaults.coupling.dropout=0.3", "target_params=5"],
    ],
)
def test_every_setting_away_from_its_default_round_trips(overrides):
    """What no shipped spec writes is printed too (a formatter that dropped `accumulate 2` passed the
    shipped specs' round trips)."""
    spec = load_spec(SPECS / "quickstart.flow", overrides)
    assert parse_spec(format_spec(spec)) == spec


def test_json_schema_and_equality_ignore_sources():
    schema = FlowSpec.model_json_schema()
    assert {"name", "flow"} <= set(schema["required"]) and "Step" not in schema["$defs"]
    assert {"CouplingStep", "SplitStep", "TrainSpec"} <= set(schema["$defs"])
    a = load_spec(SPECS / "flowpp_cifar.flow")
    b = parse_spec((SPECS / "flowpp_cifar.flow").read_text(), source="elsewhere.flow")
    assert a == b and a.flow[0].source != b.flow[0].source


def test_flowpp_resolves_every_coupling_setting():
    spec = load_spec(SPECS / "flowpp_cifar.flow")
    assert spec.name == "flowpp_cifar" and spec.target_params == 31_443_440
    flow = steps_of(spec, "coupling")
    assert len(flow) == 3 and all(
        (c.coupling, c.components, c.filters, c.blocks, c.heads, c.dropout, c.attention)
        == ("mixlogistic", 32, 96, 10, 4, 0.2, True)
        for c in flow
    )
    (deq,) = steps_of(spec, "coupling", "dequantize")
    assert (deq.filters, deq.blocks) == (96, 2)
    assert spec.dequantize.context.filters == 32 and spec.dequantize.context.blocks == 3
    assert all(n.granularity == "element" for n in steps_of(spec, "norm"))
    t = spec.train
    assert (t.lr, t.betas, t.eps, t.warmup, t.schedule, t.batch) == (
        3e-4,
        (0.9, 0.999),
        1e-8,
        2000,
        "constant",
        64,
    )
    assert (t.clip_grad_norm, t.ema, t.init_batch, t.seed, t.length) == (1.0, 0.999, 128, 0, None)
    assert (t.eval_every.count, t.eval_every.unit) == (1, "epochs")


def test_steps_carry_their_source_location():
    spec = load_spec(SPECS / "flowpp_cifar.flow")
    lines = (SPECS / "flowpp_cifar.flow").read_text().splitlines()
    for _, step in written(spec.flow) + written(spec.dequantize.steps):
        loc = step.source
        assert loc.file == str(SPECS / "flowpp_cifar.flow")
        assert lines[loc.line - 1][loc.col - 1 :].startswith(step.kind)


# ---------------------------------------------------------------- extends and defaults


def test_affine_ablation_changes_every_coupling_of_its_base():
    spec = load_spec(SPECS / "ablations" / "affine_coupling.flow")
    base = load_spec(SPECS / "flowpp_cifar.flow")
    assert spec.name == "flowpp_affine_coupling" and spec.target_params == 32_045_708
    assert all(c.coupling == "affine" and c.filters == 108 for c in all_couplings(spec))
    (deq,) = steps_of(spec, "coupling", "dequantize")
    assert deq.blocks == 2 and {c.blocks for c in steps_of(spec, "coupling")} == {10}
    assert spec.data == base.data and spec.train == base.train and spec.preprocess == base.preprocess
    # the base file's steps keep the base file's locations
    assert all(c.source.file == str(SPECS / "flowpp_cifar.flow") for c in all_couplings(spec))


def test_uniform_dequant_and_no_attention_ablations():
    base = load_spec(SPECS / "flowpp_cifar.flow")
    uniform = load_spec(SPECS / "ablations" / "uniform_dequant.flow")
    assert uniform.dequantize.kind == "uniform"
    assert [c.filters for c in all_couplings(uniform)] == [104, 104, 104]
    assert len(uniform.flow) == len(base.flow)
    no_attention = load_spec(SPECS / "ablations" / "no_attention.flow")
    assert all(c.attention is False for c in all_couplings(no_attention))
    assert {c.filters for c in all_couplings(no_attention)} == {96}


def test_seed_dogs_keeps_its_base_flow_and_merges_train():
    dogs = load_spec(SPECS / "seed_realnvp_dogs.flow")
    base = load_spec(SPECS / "seed_realnvp_cifar.flow")
    assert dogs.flow == base.flow and dogs.defaults == base.defaults
    assert dogs.data.classes == ("dog",) and dogs.data.class_indices == (5,)
    assert dogs.train.lr == 1e-5 and (dogs.train.length.count, dogs.train.length.unit) == (50, "epochs")
    assert dogs.train.model_copy(update={"lr": 1e-3, "length": base.train.length}) == base.train


SMALL = """
model small
data digits { shape 1x8x8  levels 17 }
defaults { coupling affine(filters=16, blocks=1)  norm channel }
flow {
  split checkerboard { repeat 2 { norm; pointwise; coupling; flip } }
  squeeze
  split channel { norm element; coupling mixlogistic(filters=8, heads=2); flip }
}
"""


def test_step_settings_win_over_defaults_which_win_over_builtin_defaults():
    spec = parse_spec(SMALL)
    first, second = steps_of(spec, "coupling")
    assert (first.coupling, first.filters, first.blocks, first.heads, first.components) == (
        "affine",
        16,
        1,
        4,
        32,
    )
    assert (second.coupling, second.filters, second.blocks, second.heads) == ("mixlogistic", 8, 1, 2)
    assert [n.granularity for n in steps_of(spec, "norm")] == ["channel", "element"]
    assert spec.defaults.coupling.filters == 16 and spec.defaults.norm == "channel"


def test_extends_chain_relative_to_each_file(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.flow").write_text(SMALL)
    (tmp_path / "sub" / "mid.flow").write_text('extends "../base.flow"\nmodel mid\ntrain { batch 8 }\n')
    (tmp_path / "top.flow").write_text(
        'extends "sub/mid.flow"\nmodel top\ndefaults { coupling(filters=32) }\n'
    )
    spec = load_spec(tmp_path / "top.flow")
    assert spec.name == "top" and spec.train.batch == 8
    assert [c.filters for c in steps_of(spec, "coupling")] == [32, 8]
    assert spec.defaults.coupling.coupling == "affine" and spec.defaults.norm == "channel"


# ---------------------------------------------------------------- --set overrides


def test_overrides_apply_after_extends_and_before_defaults():
    spec = load_spec(
        SPECS / "ablations" / "affine_coupling.flow",
        [
            "defaults.coupling.filters=64",
            "defaults.coupling.attention=off",
            "train.lr=1e-3",
            "train.batch=16",
            "data.classes=dog",
            "data.levels=32",
            "model=tiny",
            "dequantize=uniform",
            "train.length=100 steps",
            "train.ema=off",
            "train.augment=hflip",
            "train.schedule=step(every=500, gamma=0.1)",
            "flow.0.body.0.count=2",
        ],
    )
    assert spec.name == "tiny" and spec.dequantize.kind == "uniform"
    assert {(c.filters, c.attention, c.coupling) for c in all_couplings(spec)} == {(64, False, "affine")}
    t = spec.train
    assert (t.lr, t.batch, t.ema, t.hflip, t.schedule, t.step_every, t.step_gamma) == (
        1e-3, 16, None, True, "step", 500, 0.1
    )  # fmt: skip
    assert (t.length.count, t.length.unit) == (100, "steps")
    assert spec.data.classes == ("dog",) and spec.data.levels == 32
    assert spec.flow[0].body[0].count == 2
    assert parse_spec(format_spec(spec)) == spec


def test_override_of_a_step_setting_beats_defaults():
    spec = load_spec(
        SPECS / "flowpp_cifar.flow", ["flow.0.body.0.body.2.filters=48", "defaults.coupling.filters=64"]
    )
    assert [c.filters for c in steps_of(spec, "coupling")] == [48, 64, 64]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "defaults.coupling.filterz=64",
            "--set:1:19: unknown setting 'filterz' of defaults.coupling; did you mean 'filters'?",
        ),
        ("trian.lr=1e-3", "--set:1:1: unknown setting 'trian'; did you mean 'train'?"),
        ("train.lr=-1", "--set:1:7: lr must be > 0.0, got -1"),
        ("train.lr=fast", "--set:1:7: lr must be a number, got fast"),
        ("defaults.coupling.attention=maybe", "--set:1:19: attention must be on or off, got maybe"),
        ("data.classes=dgo", "--set:1:6: unknown cifar10 class 'dgo'; did you mean 'dog'?"),
        ("flow.9.mask=stripe", "--set:1:6: flow has steps 0 to 3, no step '9'"),
        ("flow.0.mask=strpe", "--set:1:8: unknown mask 'strpe'; did you mean 'stripe'?"),
        ("flow.1.slope=0.3", "--set:1:8: unknown setting 'slope' of flow.1 (squeeze has no settings)\n"),
        (
            "flow.0.body.0.body.0.slope=1",
            "--set:1:22: unknown setting 'slope' of flow.0.body.0.body.0 (norm); expected 'granularity'",
        ),
        ("train.lr", "--set:1:1: an override must read KEY=VALUE"),
        ("train.lr=(1,", "--set:1:13: unexpected end of file"),
        ("train.warmup=3 epochs", "--set:1:7: warmup is counted in steps"),
        ("defaults.coupling.filters=98", "--set:1:19: heads (4) must divide filters (98)"),
        ("data=dog", "--set:1:1: 'data' is a section: set one of its settings, e.g. data.SETTING=VALUE"),
        ("flow=3", "--set:1:1: 'flow' is a list of steps: set a step's setting, e.g. flow.0.SETTING=VALUE"),
        ("flow.0=flip", "--set:1:6: set a setting of the step, e.g. flow.0.SETTING=VALUE"),
    ],
)
def test_bad_override_names_the_option(override: str, message: str):
    with pytest.raises(SpecError) as caught:
        load_spec(SPECS / "flowpp_cifar.flow", [override])
    assert len(caught.value.diagnostics) == 1
    text = str(caught.value)
    assert text.startswith(message)
    assert f"\n    {override}\n" in text and text.endswith("^")


def test_several_bad_overrides_are_reported_together():
    with pytest.raises(SpecError) as caught:
        load_spec(SPECS / "quickstart.flow", ["train.batch=16", "train.bach=3", "train.ema=2"])
    assert [(d.loc.line, d.loc.col) for d in caught.value.diagnostics] == [(2, 7), (3, 7)]
    assert str(caught.value).startswith("2 errors in --set:")


@pytest.mark.parametrize(
    ("overrides", "blamed", "message"),
    [
        (
            ["train.schedule=cosine", "train.ema=0.9"],
            "--set:1:7",
            "a cosine schedule needs a training length",
        ),
        (
            ["train.accumulate=3", "train.seed=5"],
            "--set:1:7",
            "batch (64) must be divisible by accumulate (3)",
        ),
        (
            ["train.batch=30", "train.seed=5", "train.accumulate=4"],
            "--set:3:7",
            "batch (30) must be divisible",
        ),
        (
            ["defaults.coupling.heads=5", "defaults.coupling.dropout=0.1"],
            "--set:1:19",
            "heads (5) must divide filters (96)",
        ),
    ],
)
def test_a_check_between_settings_blames_a_set_of_one_of_them(overrides, blamed, message):
    with pytest.raises(SpecError) as caught:
        load_spec(SPECS / "flowpp_cifar.flow", overrides)
    assert str(caught.value).startswith(f"{blamed}: {message}")


def test_a_check_between_settings_of_the_file_blames_its_setting_not_an_unrelated_set(tmp_path: Path):
    path = tmp_path / "cosine.flow"
    path.write_text(
        "model m\nflow { split stripe { coupling } }\ntrain {\n  warmup 10 steps, then cosine\n}\n"
    )
    with pytest.raises(SpecError) as caught:
        load_spec(path, ["train.seed=1"])
    assert str(caught.value).startswith(f"{path}:4:3: a cosine schedule needs a training length")
    path.write_text(
        "model m\ndata cifar10 { classes (cat, dog) }\nflow { split stripe { coupling } }\ntrain {\n"
        "  optimizer adam(lr=1e-5)\n  warmup 10 steps, then exponential(decay=0.5, floor=1e-4)\n}\n"
    )
    with pytest.raises(SpecError) as caught:
        load_spec(path, ["train.seed=1"])
    assert str(caught.value).startswith(f"{path}:6:3: the schedule's floor (0.0001) must not exceed lr")


def test_a_set_of_defaults_that_breaks_a_steps_own_setting_names_the_step(tmp_path: Path):
    path = tmp_path / "m.flow"
    path.write_text("model m\nflow { split stripe { coupling(filters=8); flip; coupling } }\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path, ["defaults.coupling.heads=3", "train.seed=1"])
    assert str(caught.value) == (
        f"--set:1:19: heads (3) must divide filters (8), on the coupling at {path}:2:23\n"
        "    defaults.coupling.heads=3\n                      ^"
    )


def test_a_shape_error_that_a_set_causes_blames_the_set_and_names_the_step(tmp_path: Path):
    """A shape check reads the step's own settings, the data shape and the repeat counts before it: the
    latest `--set` of one of them is blamed (not the step's line, which shows the old value), and the
    message names the step; a `--set` of anything else is not."""
    quickstart = SPECS / "quickstart.flow"
    cases = {
        ("flow.0.mask=channel",): f"--set:1:8: the channel mask needs an even channel count, got 1 channels "
        f"(1x8x8), on the split at {quickstart}:17:3\n    flow.0.mask=channel\n           ^",
        ("data.shape=1x7x8", "train.seed=2"): f"--set:1:6: squeeze needs an even height and width, got "
        f"1x7x8, on the squeeze at {quickstart}:18:3",
    }
    for overrides, message in cases.items():
        with pytest.raises(SpecError) as caught:
            load_spec(quickstart, list(overrides))
        assert str(caught.value).startswith(message)
    path = tmp_path / "r.flow"
    path.write_text(
        "model r\ndata npy { shape 1x16x16 }\nflow {\n  split stripe { repeat 2 { coupling; flip } }\n"
        "  repeat 3 { squeeze }\n  split stripe { coupling }\n}\n"
    )
    cases = {
        ("flow.1.count=4", "flow.0.body.0.count=3"): "--set:1:8: the stripe mask needs an even width, got "
        f"width 1 (256x1x1), on the split at {path}:6:3",
        ("data.shape=1x16x8", "train.seed=2"): "--set:1:6: the stripe mask needs an even width",
    }
    for overrides, message in cases.items():
        with pytest.raises(SpecError) as caught:
            load_spec(path, list(overrides))
        assert str(caught.value).startswith(message)
    path.write_text(
        "model r\ndata npy { shape 2x16x7 }\nflow {\n  split channel { repeat 2 { coupling } }\n"
        "  coupling\n  squeeze\n}\n"
    )
    with pytest.raises(SpecError) as caught:  # a count in an earlier split's body decides no shape after it
        load_spec(path, ["train.seed=2", "flow.0.body.0.count=3"])
    assert [str(d.loc) for d in caught.value.diagnostics] == [f"{path}:5:3", f"{path}:6:3"]
    with pytest.raises(SpecError) as caught:  # "coupling needs two halves" reads no data shape
        load_spec(path, ["data.shape=2x16x8"])
    assert str(caught.value).startswith(f"{path}:5:3: coupling needs two halves: put it inside a split\n")


def test_what_decides_a_shape_is_what_the_step_kinds_say(tmp_path: Path, monkeypatch):
    """The loader asks the registry, not the kinds' names: the counts in the body of a step that runs it
    once inside its own layer (`copies` None, a split) decide no shape after it, and after the repair of a
    kind's `shaped` setting the repaired spec's shapes are not checked (their problems would be echoes)."""
    path = tmp_path / "r.flow"
    path.write_text(
        "model r\ndata npy { shape 2x16x7 }\nflow {\n  split channel { repeat 2 { coupling } }\n"
        "  coupling\n  squeeze\n}\n"
    )
    monkeypatch.setitem(KINDS, "split", replace(KINDS["split"], copies=lambda step: 1))
    with pytest.raises(SpecError) as caught:  # a split that copied its body: its count decides shapes
        load_spec(path, ["train.seed=2", "flow.0.body.0.count=3"])
    assert [str(d.loc) for d in caught.value.diagnostics] == [f"{OVERRIDE_FILE}:2:15", f"{path}:5:3"]
    monkeypatch.setitem(KINDS, "repeat", replace(KINDS["repeat"], shaped=()))
    with pytest.raises(SpecError) as caught:  # a repeat whose count decided no shape: the steps are blamed
        load_spec(path, ["train.seed=2", "flow.0.body.0.count=3"])
    assert [str(d.loc) for d in caught.value.diagnostics] == [f"{path}:5:3", f"{path}:6:3"]
    path.write_text(
        "model r\ndata npy { shape 2x8x7 }\nflow {\n  split channel { coupling(filters=0) }\n  squeeze\n}\n"
    )
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert [str(d.loc) for d in caught.value.diagnostics] == [f"{path}:4:28", f"{path}:5:3"]
    monkeypatch.setitem(KINDS, "coupling", replace(KINDS["coupling"], shaped=("filters",)))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert [str(d.loc) for d in caught.value.diagnostics] == [f"{path}:4:28"]


def test_a_count_of_a_step_is_named_by_its_kind():
    """`repeat count must be >= 1`: the count of any kind is named by the kind (not by its index)."""
    item = {"type": "greater_than_equal", "ctx": {"ge": 1}, "input": 0}
    assert error_message(item, "flow.0.count", None, "repeat") == "repeat count must be >= 1, got 0"
    assert error_message(item, "flow.0.count", None, "flip") == "flip count must be >= 1, got 0"
    assert error_message(item, "train.length.count", None, "train.length") == "length must be >= 1, got 0"


def test_a_set_that_makes_the_files_floor_or_classes_wrong_is_blamed(tmp_path: Path):
    """The floor below lr and the classes of the dataset are checks between settings: a `--set` of lr or
    the dataset that breaks them is the one to blame, not the file's floor or classes."""
    path = tmp_path / "m.flow"
    path.write_text(
        "model m\ndata cifar10 { classes (cat, dog) }\nflow { split stripe { coupling } }\ntrain {\n"
        "  optimizer adam(lr=1e-3)\n  warmup 10 steps, then exponential(decay=0.5, floor=1e-4)\n}\n"
    )
    cases = {
        "train.lr=1e-5": "--set:2:7: the schedule's floor (0.0001) must not exceed lr (1e-05)",
        "data.dataset=digits": "--set:2:6: digits classes are numbered: give indices, not 'cat'",
    }
    for override, message in cases.items():
        with pytest.raises(SpecError) as caught:
            load_spec(path, ["train.seed=1", override])
        assert str(caught.value).startswith(message)


def test_a_set_model_name_is_read_as_in_a_file(tmp_path: Path):
    assert load_spec(SPECS / "quickstart.flow", ["model=on"]).name == "on"
    assert load_spec(SPECS / "quickstart.flow", ["model=off"]).name == "off"
    (tmp_path / "quoted.flow").write_text('model "on"\nflow { flip }\n')
    with pytest.raises(SpecError, match="expected a name"):
        load_spec(tmp_path / "quoted.flow")
    for value in ('"on"', "12", "a(b=1)"):
        with pytest.raises(SpecError) as caught:
            load_spec(SPECS / "quickstart.flow", [f"model={value}"])
        assert str(caught.value).startswith(
            "--set:1:1: the model name must be a word of letters, digits and _ that starts with a letter "
            "or _, unquoted as in a file: model=tiny"
        )


def test_spaces_around_a_set_key_and_its_equals_sign_are_skipped():
    spec = load_spec(SPECS / "flowpp_cifar.flow", ["train.lr = 1e-3", " model =tiny ", 'data.path = " a b "'])
    assert (spec.train.lr, spec.name, spec.data.path) == (1e-3, "tiny", " a b ")
    with pytest.raises(SpecError) as caught:
        load_spec(SPECS / "quickstart.flow", ["  train.lrx = 1e-3"])
    assert str(caught.value).startswith("--set:1:9: unknown setting 'lrx' of train; did you mean 'lr'?")


# ---------------------------------------------------------------- CLI


def test_validate_all_shipped_specs(capsys):
    assert run(["validate", *map(str, ALL_SPECS)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(ALL_SPECS)
    assert f"ok: {SPECS / 'flowpp_cifar.flow'} (flowpp_cifar)" in out


def test_validate_reports_each_bad_spec_and_exits_2(tmp_path: Path, capsys):
    bad = tmp_path / "bad.flow"
    bad.write_text("model bad\nflow { split stripe { pointwse } }\n")
    assert run(["validate", str(SPECS / "quickstart.flow"), str(bad), str(tmp_path / "none.flow")]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"ok: {SPECS / 'quickstart.flow'} (quickstart)"]
    assert f"error: {bad}:2:23: unexpected 'pointwse'; did you mean 'pointwise'?" in captured.err
    assert f"error: spec file {tmp_path / 'none.flow'} not found" in captured.err
    assert "2 of 3 specs have errors" in captured.err
    assert "Traceback" not in captured.err


def test_show_prints_canonical_flow_and_json(capsys):
    path = SPECS / "ablations" / "uniform_dequant.flow"
    assert run(["show", str(path), "--set", "train.batch=32"]) == 0
    text = capsys.readouterr().out
    assert "dequantize uniform" in text and "coupling mixlogistic(filters=104, dropout=0.2)" in text
    assert parse_spec(text) == load_spec(path, ["train.batch=32"])
    assert run(["show", str(path), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["name"] == "flowpp_uniform_dequant" and data["defaults"]["coupling"]["filters"] == 104
    assert FlowSpec.model_validate(data) == load_spec(path)


def test_show_bad_override_exits_2(capsys):
    assert run(["show", str(SPECS / "quickstart.flow"), "--set", "train.bach=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set:1:7: unknown setting 'bach' of train; did you mean 'batch'?")


def test_validate_and_show_do_not_import_torch():
    code = (
        "import sys\n"
        "from flowspec.cli import main\n"
        "from flowspec.cli.app import run\n"
        f"assert run(['validate', {str(SPECS / 'flowpp_cifar.flow')!r}]) == 0\n"
        f"assert run(['show', {str(SPECS / 'seed_realnvp_dogs.flow')!r}, '--format', 'json']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- robustness


def test_absurd_nesting_is_a_clean_error_and_long_repeats_check_fast():
    deep = "model x flow { split stripe {" + "repeat 1 {" * 40 + "flip" + "}" * 40 + "} }"
    with pytest.raises(SpecError, match="blocks nested more than 32 deep") as caught:
        parse_spec(deep)
    assert len(caught.value.diagnostics) == 1
    # a billion repetitions of a shape-preserving body: checked without unrolling them
    spec = parse_spec("model x flow { split stripe {" + "repeat 1000 {" * 3 + "flip" + "}" * 3 + "} }")
    assert spec.flow[0].body[0].count == 1000


# ---------------------------------------------------------------- the data section


def test_data_sources_and_preparation_round_trip():
    flow = "flow { split stripe { coupling affine(filters=4, blocks=1); flip } }"
    spec = parse_spec(
        'model m data folder { path "photos"  shape 3x16x16  levels 32  convert (size, mode, depth)  '
        f"test_split 0.02  classes (cat, 3) }} {flow}"
    )
    data = spec.data
    assert (data.dataset, data.path, data.convert, data.test_split) == (
        "folder",
        "photos",
        ("size", "mode", "depth"),
        0.02,
    )
    assert data.classes == ("cat", 3) and parse_spec(format_spec(spec)) == spec
    tv = parse_spec(f'model m data torchvision {{ name "CIFAR100"  path "/data"  convert size }} {flow}')
    assert (tv.data.name, tv.data.convert) == ("CIFAR100", ("size",)) and parse_spec(format_spec(tv)) == tv
    npy = parse_spec(
        f'model m data npy {{ path "train_64x64.npy"  test_path "valid_64x64.npy"  shape 3x16x16 }} {flow}',
    )
    assert npy.data.test_path == "valid_64x64.npy" and parse_spec(format_spec(npy)) == npy
    sets = ["data.convert=all", "data.dataset=npy", "data.test_split=100"]
    over = load_spec(SPECS / "quickstart.flow", sets)
    assert over.data.convert == ("size", "mode", "depth") and over.data.test_split == 100


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            "npy { test_split 1.5 }",
            r"test_split is a count of images \(1 or more\) or a fraction in \(0, 1\)",
        ),
        ("npy { convert sizes }", r"convert"),
        ('npy { name "MNIST" }', r"name is for dataset torchvision, not npy"),
        ("torchvision", r'dataset torchvision needs the dataset\'s class: name "CIFAR100"'),
        ("cifar10 { test_split 10 }", r"cifar10 has its own test split"),
        ('npz { path "d"  test_path "t" }', r"npz has its own test split: remove test_split and test_path"),
        ('imagenet { test_path "t" }', r"test_path is for datasets npy and folder: imagenet finds its own"),
        ('digits { path "/nope" }', r"digits are scikit-learn's bundled images: remove path"),
        ('npy { test_split 10  test_path "t.npy" }', r"give test_path or test_split, not both"),
        ("imagenet { classes 1000 }", r"class index 1000 is out of range for imagenet \(0 to 999\)"),
        ("cifar10 { classes (cat, dog, 3) }", r"classes names class 3 \(cat\) twice"),
        ("folder { classes (a, b, a) }", r"classes names class a twice"),
        ("npy { convert (size, depth, size) }", r"convert names 'size' twice"),
        ('npy { path "" }', r"path is empty: give a path"),
        ('torchvision { name "" }', r"name is empty: give a class name"),
        ("npy { shape 1x65537x2 }", r"shape 1x65537x2 is too large: at most 65,536 a dimension"),
        ("npy { shape 3x16384x16384 }", r"and 268,435,456 values an image"),
    ],
)
def test_data_section_mistakes(data: str, message: str):
    with pytest.raises(SpecError, match=message):
        parse_spec(f"model m data {data} flow {{ split stripe {{ flip }} }}")


def test_an_inherited_path_or_name_is_dropped_by_none_and_a_quoted_none_is_a_folder(tmp_path):
    (tmp_path / "base.flow").write_text(
        'model m\ndata npy { path "x.npy"  test_split 100  shape 1x8x8 }\nflow { squeeze }\n'
    )
    child = tmp_path / "child.flow"
    child.write_text('extends "base.flow"\ndata digits { path none  test_split none }\n')
    assert load_spec(child).data.path is None
    assert load_spec(tmp_path / "base.flow", ['data.path="none"']).data.path == "none"
    vision = ['data.name="MNIST"', "data.dataset=torchvision", "data.test_split=none"]
    assert load_spec(tmp_path / "base.flow", vision).data.name == "MNIST"
    with pytest.raises(SpecError, match=r'dataset torchvision needs the dataset\'s class: name "CIFAR100"'):
        load_spec(tmp_path / "base.flow", [*vision, "data.name=none"])


@pytest.mark.parametrize("betas", ["(0.9)", "()", "(0.9, 0.99, 0.5)", "0.9"])
def test_betas_are_two_values(betas):
    with pytest.raises(SpecError, match=r"--set:1:7: betas are two values, e.g. \(0.9, 0.999\), got"):
        load_spec(SPECS / "quickstart.flow", [f"train.betas={betas}"])
    with pytest.raises(SpecError, match=r"betas are two values, e.g. \(0.9, 0.999\), got \(0.9\)"):
        parse_spec("model m\nflow { squeeze }\ntrain { optimizer adam(betas=(0.9)) }\n")


def test_a_byte_order_mark_is_ignored_and_the_lines_are_counted_as_written(tmp_path):
    path = tmp_path / "bom.flow"
    path.write_bytes(b"\xef\xbb\xbfmodel bom\nflow { squeeze }\ntrain { batch 0 }\n")
    with pytest.raises(SpecError, match=r"bom.flow:3:9: batch must be >= 1, got 0"):
        load_spec(path)
    assert load_spec(path, overrides=["train.batch=8"]).name == "bom"


@pytest.mark.parametrize("name", ['"../../escape/x"', '"a b"', '""', "a" * 101])
def test_the_model_name_is_a_word_because_it_names_the_run_folder(name):
    with pytest.raises(SpecError, match=r"the model name must be a word of letters, digits and _"):
        parse_spec("model m\nflow { squeeze }\n", overrides=[f"model={name}"])


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("cosine(every=5)", "the cosine schedule has no setting 'every': it takes no settings"),
        ("constant(decay=0.5)", "the constant schedule has no setting 'decay'"),
        ("step(hold=5)", "the step schedule has no setting 'hold': it takes every, gamma"),
        (
            "exponential(gamma=0.5)",
            "the exponential schedule has no setting 'gamma': it takes hold, decay, floor",
        ),
    ],
)
def test_a_schedule_refuses_the_settings_of_another(schedule, message):
    text = f"model m\nflow {{ squeeze }}\ntrain {{ length 10 steps  warmup 1 steps, then {schedule} }}\n"
    with pytest.raises(SpecError) as caught:
        parse_spec(text, source="m.flow")
    assert f"m.flow:3:26: {message}" in str(caught.value)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ('train.batch="8"', 'batch must be a number, got the text "8": write numbers without quotes'),
        ('train.lr="1e-3"', 'lr must be a number, got the text "1e-3"'),
        ("train.batch=8.0", "batch must be a whole number, got 8.0"),
        ("defaults.coupling.attention=no", "attention must be on or off, got no"),
        ("defaults.coupling.attention=true", "attention must be on or off, got true"),
        (
            'defaults.coupling.attention="on"',
            'attention must be on or off, got the text "on": write it without',
        ),
    ],
)
def test_numbers_and_booleans_are_written_as_such(setting, message):
    """Values are validated strictly: no text is read as a number, and only on / off are booleans."""
    text = "model m\ndefaults { coupling mixlogistic(filters=4) }\nflow { split stripe { coupling } }\n"
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(text, overrides=[setting])


def test_whole_numbers_are_taken_where_decimals_are_expected():
    text = "model m\nflow { split stripe { coupling mixlogistic(filters=4, dropout=0) } }\n"
    text += "train { optimizer adam(lr=1) }\n"
    spec = parse_spec(text, overrides=["train.clip_grad_norm=1", "defaults.coupling.attention=off"])
    assert (spec.train.lr, spec.train.clip_grad_norm, spec.flow[0].body[0].dropout) == (1.0, 1.0, 0.0)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.batch=8 steps", "--set:1:7: batch must be a number, got 8 steps"),
        ("data.shape=8x8", "--set:1:6: shape is C x H x W (channels, height, width), e.g. 3x32x32, got 8x8"),
        ("data.shape=1x3x8x8", "got 1x3x8x8"),
        ("data.test_split=half", "--set:1:6: test_split must be a number, got half"),
        ("data.classes=(1, 2.5)", "--set:1:6: classes must be a whole number, got 2.5"),
        ("train.augment=vflip", "--set:1:7: augment is hflip or none, got vflip"),
        ("train.batch=99999999999999999999999", "batch must be <= 1048576, got 99999999999999999999999"),
        ("train.eval=0 steps", "--set:1:7: eval every must be >= 1, got 0"),
        ("train.eval=5", "--set:1:7: eval every must be a count of steps or epochs, e.g. `100 steps`"),
        ("train.save=5", "--set:1:7: save every must be a count of steps or epochs, e.g. `100 steps`"),
        ("train.save=0 steps", "--set:1:7: save every must be >= 1, got 0"),
    ],
)
def test_a_wrong_value_gets_one_message_in_the_words_of_the_file(setting, message):
    """One error per mistake (not one per member of a union, nor again after a repair), naming the
    setting as the file writes it."""
    text = "model m\ndata npz { shape 1x8x8  levels 17 }\nflow { split stripe { coupling(filters=4) } }\n"
    with pytest.raises(SpecError) as caught:
        parse_spec(text, overrides=[setting])
    assert message in str(caught.value).splitlines()[0]
    assert str(caught.value).count("\n") == 2  # one error: the message, the line, the caret


def test_an_empty_variational_dequantizer_is_blamed_at_its_line():
    text = "model m\ndata digits { shape 1x8x8  levels 17 }\ndequantize variational { }\nflow { squeeze }\n"
    with pytest.raises(
        SpecError, match=r"m.flow:3:1: `dequantize variational` has no steps: write them, then"
    ):
        parse_spec(text, source="m.flow")


def test_validate_names_the_spec_of_an_error_in_set(tmp_path, capsys):
    paths = []
    for name in ("a", "b"):
        paths.append(tmp_path / f"{name}.flow")
        paths[-1].write_text(f"model {name}\nflow {{ squeeze }}\n")
    assert run(["validate", *map(str, paths), "--set", "train.batch=0"]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: {paths[0]}: --set:1:7: batch must be >= 1" in err and f"error: {paths[1]}: --set:1:7" in err
    )


def test_settings_made_unused_by_another_file_or_a_set_are_allowed(tmp_path):
    """An ablation may change the kind of its base's couplings, whose own settings then go unused."""
    (tmp_path / "base.flow").write_text(
        "model base\ndata digits { shape 1x8x8  levels 17 }\n"
        "flow { split stripe { coupling(components=8, heads=2, filters=4) } }\n"
    )
    (tmp_path / "affine.flow").write_text(
        'extends "base.flow"\nmodel affine\ndefaults { coupling affine(attention=off) }\n'
    )
    coupling = load_spec(tmp_path / "affine.flow").flow[0].body[0]  # components held at its built-in value
    assert (coupling.coupling, coupling.components, coupling.attention) == ("affine", 32, False)
    spec = load_spec(tmp_path / "base.flow", overrides=["flow.0.body.0.coupling=affine"])
    assert spec.flow[0].body[0].coupling == "affine" and spec.flow[0].body[0].components == 32
    spec = load_spec(tmp_path / "base.flow", overrides=["flow.0.body.0.network=resnet"])
    assert spec.flow[0].body[0].network == "resnet"
    # a default that one of the couplings inheriting it uses is not unused
    for defaults, flow in (
        ("coupling affine(components=4, filters=4)", "coupling; flip; coupling mixlogistic"),
        ("coupling(network=resnet, weight_norm=on, filters=4)", "coupling(network=gated); flip; coupling"),
    ):
        text = f"model m\ndata digits {{ shape 1x8x8  levels 17 }}\ndefaults {{ {defaults} }}\n"
        assert parse_spec(f"{text}flow {{ split stripe {{ {flow} }} }}\n").name == "m"
    # a dequantizer coupling's dropout is the context network's too: never unused
    deq = "dequantize variational { split stripe { coupling affine(network=resnet, dropout=0.3) } sigmoid }"
    spec = parse_spec(f"model m\ndata digits {{ shape 1x8x8  levels 17 }}\n{deq}\nflow {{ squeeze }}\n")
    assert spec.dequantize.steps[0].body[0].dropout == 0.3


BASE_WITH_OTHER_KINDS = (  # steps of other kinds and networks than the defaults, which they inherit
    'model g1\ndata folder { path "/d"  shape 3x8x8  test_split 1 }\n'
    "defaults { coupling mixlogistic(components=8, heads=2) }\n"
    "flow { split checkerboard { coupling additive  coupling mixlogistic  coupling(network=gated)\n"
    "  coupling } }\n"
)


@pytest.mark.parametrize(
    ("base", "change"),
    [
        ("imagenet64", "coupling affine"),
        ("imagenet64", "coupling additive"),
        ("imagenet32", "coupling(network=resnet)"),
        ("g1", "coupling affine"),
        ("g1", "coupling(attention=off)"),
    ],
)
def test_show_of_an_ablation_that_makes_its_bases_defaults_unused_parses_back(tmp_path, base, change):
    """The base's `components=4` (or `final_elu=on`, `weight_norm=on`, `heads=2`) would be printed beside
    the kind (or network, attention) that makes it unused, in a file that refuses it: every coupling, and
    `defaults`, holds a setting it leaves unused at its built-in value (`show` leaves it out); the
    couplings that use it keep it and write it themselves."""
    (tmp_path / "g1.flow").write_text(BASE_WITH_OTHER_KINDS)
    base_path = tmp_path / "g1.flow" if base == "g1" else SPECS / f"{base}.flow"
    path = tmp_path / "ablation.flow"
    path.write_text(f'extends "{base_path}"\nmodel ablation\ndefaults {{ {change} }}\n')
    spec = load_spec(path)
    shown = format_spec(spec)
    again = parse_spec(shown, source=str(tmp_path / "shown.flow"))
    assert again.model_dump() == spec.model_dump() and format_spec(again) == shown
    before = all_couplings(load_spec(base_path))
    for old, new in zip(before, all_couplings(spec), strict=True):  # a used setting keeps what it inherited
        for name in ("components", "final_elu", "heads"):
            if name not in held_at_builtin(new) and name not in held_at_builtin(old):
                assert getattr(new, name) == getattr(old, name), name


@pytest.mark.parametrize("char", ["\r", "\x00", "\x1b"])
def test_a_control_character_in_a_quoted_string_is_refused_at_it(capsys, char):
    """A file ends its line at a carriage return, so `show` would print a `--set data.path="a\rb"` that
    parses back to another spec, or not at all; a file's own string is refused alike."""
    path = str(SPECS / "imagenet64.flow")
    assert run(["show", path, "--set", "train.lr=1e-3", "--set", f'data.path="a{char}b"']) == 2
    out, err = capsys.readouterr()
    assert not out and err.startswith(
        f"error: --set:2:13: a quoted string cannot hold a control character, got {char!r}"
    )
    assert '\n    data.path="a?b"\n' in err  # the line shown, on one line of its own
    data = 'data folder { path "/d"  shape 1x8x8  classes (x, "a\x7f")  test_split 1 }'
    text = f"model m\n{data}\nflow {{ squeeze }}\n"
    with pytest.raises(SpecError, match=r"m\.flow:2:53: a quoted string cannot hold a control character"):
        parse_spec(text, source="m.flow")


def test_a_coupling_made_in_python_holds_its_unused_settings_at_their_built_in_values(recwarn):
    """As a parsed one does, without pydantic's warning about a validator returning another instance."""
    step = CouplingStep(coupling="affine", components=8, network="resnet", heads=3, dropout=0.3)
    assert (step.components, step.heads, step.dropout) == (32, 4, 0.3)  # dropout: the context network's
    assert "components" not in step.model_fields_set and not recwarn.list


def test_show_quotes_class_names_that_are_not_plain_words(tmp_path):
    data = 'data folder { path "/d"  shape 1x8x8  classes ("on", "café", x)  test_split 1 }'
    text = f"model m\n{data}\nflow {{ squeeze }}\n"
    spec = parse_spec(text)
    shown = format_spec(spec)
    assert 'classes ("on", "café", x)' in shown and parse_spec(shown) == spec


def test_a_schedule_statement_replaces_the_whole_schedule(tmp_path):
    """A schedule that replaces another (with --set, or in an extending file) keeps none of its settings,
    so `show` prints a spec that parses back; setting another schedule's field directly is an error."""
    spec = load_spec(SPECS / "imagenet64.flow", overrides=["train.schedule=step(every=1000, gamma=0.5)"])
    assert (spec.train.schedule, spec.train.exp_hold, spec.train.exp_decay) == ("step", 0, 0.9999)
    shown = format_spec(spec)
    assert (
        "then step(every=1000, gamma=0.5)" in shown
        and parse_spec(shown, source=str(SPECS / "x.flow")) == spec
    )
    (tmp_path / "base.flow").write_text(
        "model b\nflow { squeeze }\ntrain { warmup 5 steps, then exponential(hold=40) }\n"
    )
    (tmp_path / "kid.flow").write_text(
        'extends "base.flow"\nmodel k\ntrain { warmup 0 steps, then cosine  length 9 steps }\n'
    )
    assert load_spec(tmp_path / "kid.flow").train.exp_hold == 0
    with pytest.raises(
        SpecError, match=r"--set:1:7: every is a setting of the step schedule; this spec's schedule is"
    ):
        load_spec(SPECS / "imagenet64.flow", overrides=["train.step_every=5"])


def test_a_schedule_keeps_its_own_inherited_settings_and_resets_written_nowhere(tmp_path):
    (tmp_path / "base.flow").write_text(
        "model b\nflow { squeeze }\ntrain { warmup 5 steps, then step(every=100, gamma=0.5) }\n"
    )
    (tmp_path / "kid.flow").write_text(
        'extends "base.flow"\nmodel k\ntrain { warmup 10 steps, then step(gamma=0.9) }\n'
    )
    kid = load_spec(tmp_path / "kid.flow")
    assert (kid.train.step_every, kid.train.step_gamma) == (100, 0.9)
    ordered = load_spec(tmp_path / "base.flow", overrides=["train.step_every=500", "train.schedule=step"])
    assert ordered.train.step_every == 500
    written = setting_sources(SPECS / "quickstart.flow")
    assert not {"train.step_every", "train.exp_hold", "train.exp_floor"} & set(written)  # reset, not written


def test_save_every_is_an_interval_or_off_and_shows_back():
    text = "model m\nflow { squeeze }\ntrain {\n  save every 500 steps\n  length 2 epochs\n}\n"
    spec = parse_spec(text, source="m.flow")
    assert (spec.train.save_every.count, spec.train.save_every.unit) == (500, "steps")
    assert "  save every 500 steps" in format_spec(spec).splitlines()
    assert parse_spec(format_spec(spec)) == spec
    off = parse_spec(text.replace("500 steps", "off"))
    assert off.train.save_every is None and parse_spec(format_spec(off)) == off
    assert parse_spec(text, overrides=["train.save=3 epochs"]).train.save_every.unit == "epochs"


def test_a_second_warmup_follows_the_schedule_and_a_new_schedule_drops_it(tmp_path):
    base = tmp_path / "base.flow"
    base.write_text(
        "model base\nflow { squeeze }\ntrain {\n  optimizer adam(lr=4e-4)\n"
        "  warmup 100 steps, then exponential(hold=10, decay=0.9, floor=3e-4),\n"
        "    then warmup(at=1000, steps=50, lr=1e-5)\n}\n"
    )
    spec = load_spec(base)
    assert (spec.train.rewarm_at, spec.train.rewarm_steps, spec.train.rewarm_lr) == (1000, 50, 1e-5)
    assert parse_spec(format_spec(spec)) == spec
    child = tmp_path / "child.flow"
    child.write_text('extends "base.flow"\nmodel child\ntrain { warmup 20 steps }\n')
    assert load_spec(child).train.rewarm_at == 1000  # the warmup's length alone keeps the schedule
    child.write_text('extends "base.flow"\nmodel child\ntrain { warmup 20 steps, then constant }\n')
    assert load_spec(child).train.rewarm_at is None


@pytest.mark.parametrize(
    ("then", "message"),
    [
        (
            "cosine",
            "a second warmup is written `warmup(at=STEP, steps=N, lr=LR)` (after the schedule: `then",
        ),
        ("warmup(at=500, steps=10)", "the second warmup needs at=STEP, steps=N and lr=LR; lr missing"),
        (
            "warmup(at=500, stepz=10, lr=1e-5)",
            "unknown setting 'stepz' of the second warmup; did you mean 'steps'?",
        ),
        ("warmup(at=50, steps=10, lr=1e-5)", "the second warmup must start after the first ends (step 100)"),
        ("warmup(at=500, steps=10, lr=0)", "m.flow:4:3: the second warmup's lr must be > 0.0, got 0"),
    ],
)
def test_a_wrong_second_warmup_says_what_it_takes(then, message):
    text = f"model m\nflow {{ squeeze }}\ntrain {{\n  warmup 100 steps, then constant, then {then}\n}}\n"
    with pytest.raises(SpecError) as caught:
        parse_spec(text, source="m.flow")
    assert message in str(caught.value)


def test_the_second_warmup_is_set_and_removed_with_set_and_must_start_before_the_end():
    spec = load_spec(SPECS / "imagenet64_5bit.flow")
    assert spec.train.rewarm_at == 110000
    removed = load_spec(SPECS / "imagenet64_5bit.flow", overrides=["train.rewarm=off"]).train
    assert (removed.rewarm_at, removed.rewarm_steps, removed.rewarm_lr) == (None, None, None)
    later = load_spec(
        SPECS / "imagenet64.flow", overrides=["train.rewarm=warmup(at=150000, steps=10, lr=1e-5)"]
    )
    assert (later.train.rewarm_at, later.train.rewarm_steps, later.train.rewarm_lr) == (150000, 10, 1e-5)
    with pytest.raises(
        SpecError, match=r"starts at step 110000, after the training ends \(length 100000 steps\)"
    ):
        load_spec(SPECS / "imagenet64_5bit.flow", overrides=["train.length=100000 steps"])


def test_data_settings_go_back_to_none_with_their_words():
    spec = load_spec(SPECS / "celeba64_5bit.flow", overrides=["data.test_split=none"])
    assert spec.data.test_split is None
    spec = load_spec(SPECS / "quickstart.flow", overrides=["data.classes=(1, 2)", "data.classes=all"])
    assert spec.data.classes is None and parse_spec(format_spec(spec)) == spec


def test_quoted_all_and_none_are_names_not_the_unset_words():
    data = 'data folder { path "x"  shape 3x8x8  classes ("all", dog)  test_split 5 }'
    text = f"model m\n{data}\nflow {{ squeeze }}\n"
    spec = parse_spec(text)
    assert spec.data.classes == ("all", "dog") and parse_spec(format_spec(spec)) == spec


def test_a_dequantizer_step_is_set_by_the_path_inspect_shows_or_by_its_steps():
    """`inspect --format json` and diff's parameter rows name dequantizer steps `dequantize.I...`."""
    path = SPECS / "flowpp_cifar.flow"
    short = load_spec(path, ["dequantize.0.body.0.body.2.filters=12"])
    assert short == load_spec(path, ["dequantize.steps.0.body.0.body.2.filters=12"])
    assert short.dequantize.steps[0].body[0].body[2].filters == 12
    with pytest.raises(
        SpecError, match=r"--set:1:12: set a setting of the step, e.g. dequantize.steps.0.SETTING"
    ):
        load_spec(path, ["dequantize.0=1"])


@pytest.mark.parametrize("word", ["inf", "nan"])
def test_inf_and_nan_words_are_not_finite_numbers(word):
    with pytest.raises(SpecError, match=rf"--set:1:7: lr must be a finite number, got {word}"):
        load_spec(SPECS / "quickstart.flow", [f"train.lr={word}"])


def test_rules_newer_than_a_checkpoint_leave_its_stored_spec_loading(tmp_path):
    """A class named twice and a sigmoid in the flow are refused in spec files; a checkpoint's stored
    spec, or a run folder's spec.flow, written before those rules still loads and builds."""
    text = (
        "model old\ndata digits { shape 1x8x8  levels 17  classes (3, 3) }\n"
        "flow { split stripe { coupling(filters=4, blocks=1, heads=1); flip } sigmoid }\n"
    )
    with pytest.raises(SpecError) as caught:
        parse_spec(text)
    assert [d.message.split(":")[0] for d in caught.value.diagnostics] == [
        "classes names class 3 twice",
        "sigmoid belongs at the end of the variational dequantizer",
    ]
    stored = parse_spec(text, stored=True)
    assert stored.data.classes == (3, 3) and not shape_issues(stored)  # it builds
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "spec.json").write_text(stored.model_dump_json())
    (folder / "spec.flow").write_text(text)  # an old run's, without today's first line
    assert load_spec(folder / "spec.flow").data.classes == (3, 3)
    (tmp_path / "spec.flow").write_text(text)  # not beside a spec.json: a spec file
    with pytest.raises(SpecError, match="classes names class 3 twice"):
        load_spec(tmp_path / "spec.flow")


def test_a_stored_spec_takes_overrides_and_keeps_a_name_no_file_could_write():
    from flowspec.loader import stored_with_overrides

    spec = load_spec(SPECS / "quickstart.flow").model_copy(update={"name": "my model-1.0"})
    kept = stored_with_overrides(spec, ["eval.images=8"], "stored")
    assert (kept.name, kept.eval.images) == ("my model-1.0", 8)
    assert stored_with_overrides(spec, ["model=other"], "stored").name == "other"
    assert stored_with_overrides(spec, ["model=stored"], "stored").name == "stored"
    assert stored_with_overrides(spec, [" model = stored"], "stored").name == "stored"


# ---------------------------------------------------------------- found by a mutation audit

ONE_FLOW = "model m\nflow { split stripe { coupling; flip } }\n"


def test_extends_merges_the_eval_section_setting_by_setting(tmp_path: Path):
    (tmp_path / "base.flow").write_text(ONE_FLOW + "eval { images 500  samples 16 }\n")
    (tmp_path / "top.flow").write_text('extends "base.flow"\nmodel top\neval { samples 8 }\n')
    spec = load_spec(tmp_path / "top.flow")
    assert (spec.eval.images, spec.eval.samples) == (500, 8)


def test_show_writes_floats_exactly():
    """Seven significant digits and more survive `show`: the formatter must not round a float."""
    overrides = [
        "train.lr=0.000123456789",
        "preprocess.alpha=0.0123456789",
        "eval.temperatures=(0.987654321)",
    ]
    spec = parse_spec(ONE_FLOW, overrides=overrides)
    again = parse_spec(format_spec(spec))
    assert (again.train.lr, again.preprocess.alpha, again.eval.temperatures) == (
        0.000123456789,
        0.0123456789,
        (0.987654321,),
    )


def test_eval_images_all_means_every_test_image():
    assert parse_spec(ONE_FLOW + "eval { images all }\n").eval.images is None
    assert parse_spec(ONE_FLOW + "eval { images 100 }\n", overrides=["eval.images=all"]).eval.images is None


@pytest.mark.parametrize(
    ("train", "col", "message"),
    [
        ("seed 1__0", 15, "unexpected '__0'"),  # digits are grouped by single underscores
        ("warmup 10 steps then cosine", 25, "unexpected 'then'"),  # `warmup N steps, then SCHEDULE`
        ("eval 100 steps", 14, "unexpected '100'; expected 'every'"),  # `eval every N`
    ],
)
def test_syntax_the_grammar_does_not_take_is_refused(train, col, message):
    with pytest.raises(SpecError) as caught:
        parse_spec(ONE_FLOW + f"train {{ {train} }}\n", source="bad.flow")
    assert str(caught.value).startswith(f"bad.flow:3:{col}: {message}")


def test_levels_and_sample_grid_bounds():
    """A pixel takes at least 2 values; a sample grid holds at most 4096 images."""
    assert parse_spec(ONE_FLOW + "data { levels 2 }\n").data.levels == 2
    assert parse_spec(ONE_FLOW + "eval { samples 4096 }\n").eval.samples == 4096
    for text, message in [
        ("data { levels 1 }", "bad.flow:3:8: levels must be >= 2, got 1"),
        ("eval { samples 4097 }", "bad.flow:3:8: samples must be <= 4096, got 4097"),
    ]:
        with pytest.raises(SpecError) as caught:
            parse_spec(ONE_FLOW + text + "\n", source="bad.flow")
        assert str(caught.value).startswith(message)


def test_blocks_nest_32_deep_and_no_deeper():
    def nested(depth: int) -> str:  # a split holding depth - 1 repeats inside each other
        return "model x flow { split stripe {" + "repeat 1 {" * (depth - 1) + "flip" + "}" * depth + " }"

    assert len(parse_spec(nested(32)).flow) == 1
    with pytest.raises(SpecError, match="blocks nested more than 32 deep"):
        parse_spec(nested(33))


def test_at_most_ten_syntax_errors_are_reported():
    text = ONE_FLOW + "".join(f"trian {{ seed {i} }}\n" for i in range(12))
    with pytest.raises(SpecError) as caught:
        parse_spec(text, source="bad.flow")
    assert [d.loc.line for d in caught.value.diagnostics] == list(range(3, 13))


def test_setting_the_dequantizer_to_its_own_kind_keeps_it():
    """`--set dequantize=variational` on a variational spec changes nothing: its context and steps stay."""
    spec = load_spec(SPECS / "flowpp_cifar.flow")
    assert spec.dequantize.kind == "variational" and spec.dequantize.steps
    assert load_spec(SPECS / "flowpp_cifar.flow", ["dequantize=variational"]) == spec


@pytest.mark.parametrize(
    "override", ["dequantize.context.filters=8", "dequantize.foo=8", "dequantize.steps=2"]
)
def test_a_set_inside_an_unwritten_dequantizer_is_read_as_the_uniform_one(override: str):
    """A spec that writes no dequantizer has the uniform one, which has no settings: the one error says so,
    and the refused set leaves no empty dequantizer behind to be refused again (as of no kind)."""
    setting = override.split(".")[1].partition("=")[0]
    with pytest.raises(SpecError) as caught:
        parse_spec(ONE_FLOW, overrides=[override])
    found = [(d.loc.file, d.loc.line, d.loc.col, d.message) for d in caught.value.diagnostics]
    assert found == [("--set", 1, 12, f"unknown setting '{setting}' of dequantize (uniform has no settings)")]


def test_a_refused_set_inside_an_unwritten_section_leaves_the_other_sets_in_place():
    assert parse_spec(ONE_FLOW, overrides=["train.seed=3"]).train.seed == 3  # an unwritten section, made
    with pytest.raises(SpecError) as caught:
        parse_spec(ONE_FLOW, overrides=["dequantize.foo=1", "train.seed=3", "train.sead=4"])
    assert [(d.loc.line, d.loc.col) for d in caught.value.diagnostics] == [(1, 12), (3, 7)]


def test_a_single_temperature_is_one_sample_grid():
    assert parse_spec(ONE_FLOW + "eval { temperatures 0.9 }\n").eval.temperatures == (0.9,)
    assert parse_spec(ONE_FLOW, overrides=["eval.temperatures=0.5"]).eval.temperatures == (0.5,)


def test_a_shape_error_from_two_sets_is_blamed_on_the_later_one():
    text = "model m\ndata { shape 1x8x8 }\nflow { split stripe { coupling; flip } }\n"
    with pytest.raises(SpecError) as caught:
        parse_spec(text, source="bad.flow", overrides=["data.shape=3x8x8", "flow.0.mask=channel"])
    assert str(caught.value).startswith("--set:2:8: the channel mask needs an even channel count")


def test_an_unquoted_windows_path_is_told_to_be_quoted():
    with pytest.raises(SpecError) as caught:
        parse_spec(ONE_FLOW + "data folder { path photos\\cats }\n", source="bad.flow")
    assert str(caught.value).startswith(
        "bad.flow:3:26: unexpected character '\\\\'; paths and other text are written in quotes"
    )


def test_a_second_warmup_starts_at_step_1_or_later():
    def train(at: int) -> str:
        rewarm = f"warmup(at={at}, steps=5, lr=1e-4)"
        return f"train {{ length 100 steps  warmup 0 steps, then cosine, then {rewarm} }}"

    assert parse_spec(ONE_FLOW + train(1)).train.rewarm_at == 1
    with pytest.raises(SpecError) as caught:
        parse_spec(ONE_FLOW + train(0), source="bad.flow")
    assert [d.message for d in caught.value.diagnostics] == ["the second warmup's at must be >= 1, got 0"]


def test_a_mistake_in_an_extended_file_is_reported(tmp_path: Path):
    (tmp_path / "base.flow").write_text(ONE_FLOW + "train { batch 8  batch 16 }\n")
    (tmp_path / "top.flow").write_text('extends "base.flow"\nmodel top\n')
    with pytest.raises(SpecError) as caught:
        load_spec(tmp_path / "top.flow")
    assert [(Path(d.loc.file).name, d.loc.line, d.loc.col, d.message) for d in caught.value.diagnostics] == [
        ("base.flow", 3, 18, "duplicate setting 'batch' in train (first set at line 3)")
    ]


def test_a_set_of_a_step_past_the_last_names_the_steps_there_are():
    with pytest.raises(SpecError) as caught:
        parse_spec(ONE_FLOW, overrides=["flow.1.mask=channel"])
    assert str(caught.value).startswith("--set:1:6: flow has steps 0 to 0, no step '1'")
