"""Tests from a mutation audit of the language's meaning (parser, resolve, spec, formatter, loader, shapes):
each pins what a plausible bug changed and every other test let pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowspec import load_spec, parse_spec
from flowspec.diagnostics import SpecError
from flowspec.formatter import format_spec
from flowspec.spec import CouplingSettings

FLOW = "model m\nflow { split stripe { coupling; flip } }\n"
TRAIN = "model m\nflow { split stripe { coupling; flip } }\ntrain { %s }\n"


def error_of(text: str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec(text, overrides=overrides)
    return str(caught.value)


def test_the_built_in_defaults_are_those_the_readme_gives():
    """A spec that writes only `model` and `flow` takes the defaults the README's tables give (`show`
    writes most of them out, so a changed one still round-trips)."""
    spec = parse_spec("model m\nflow { split stripe { norm; coupling; flip } }\n")
    data, train, ev = spec.data, spec.train, spec.eval
    assert (data.dataset, data.shape, data.levels, data.classes, data.convert) == (
        "cifar10",
        (3, 32, 32),
        256,
        None,
        (),
    )
    assert (spec.preprocess.kind, spec.preprocess.alpha, spec.dequantize.kind, spec.prior) == (
        "logit",
        0.05,
        "uniform",
        "normal",
    )
    assert (spec.defaults.norm, spec.flow[0].body[0].granularity) == ("element", "element")
    assert spec.defaults.coupling == CouplingSettings(
        coupling="mixlogistic", components=32, filters=96, blocks=10, heads=4, attention=True, dropout=0.0
    )
    assert (train.optimizer, train.lr, train.betas, train.eps, train.tf_eps, train.weight_decay) == (
        "adam",
        3e-4,
        (0.9, 0.999),
        1e-8,
        False,
        0.0,
    )
    assert (train.warmup, train.schedule, train.rewarm_at, train.batch, train.accumulate) == (
        0,
        "constant",
        None,
        64,
        1,
    )
    assert (train.clip_grad_norm, train.ema, train.init_batch, train.seed, train.length) == (
        None,
        None,
        128,
        0,
        None,
    )
    assert (train.eval_every.count, train.eval_every.unit, train.save_every, train.hflip) == (
        1,
        "epochs",
        None,
        False,
    )
    assert (train.step_every, train.step_gamma, train.exp_hold, train.exp_decay, train.exp_floor) == (
        10000,
        0.5,
        0,
        0.9999,
        0.0,
    )
    assert (ev.images, ev.batch, ev.samples, ev.temperatures, ev.inversion) == (
        None,
        None,
        64,
        (1.0, 0.8),
        True,
    )


def test_a_variational_dequantizers_context_defaults_to_32_filters_and_3_blocks():
    """`context(...)` left out, or with only some settings, takes the README's defaults."""
    deq = "dequantize variational { split stripe { coupling; flip } sigmoid }\n"
    context = parse_spec(FLOW + deq).dequantize.context
    assert (context.filters, context.blocks, context.layernorm, context.attention, context.heads) == (
        32,
        3,
        False,
        False,
        4,
    )
    assert context.weight_norm is False


def test_a_preprocess_of_an_extending_file_changes_only_the_settings_it_names(tmp_path: Path):
    """`preprocess` merges setting by setting over its base's (README, Extends), as `data` and `train` do."""
    (tmp_path / "base.flow").write_text(FLOW + "preprocess logit(alpha=0.01)\n")
    (tmp_path / "top.flow").write_text('extends "base.flow"\nmodel top\npreprocess logit\n')
    assert load_spec(tmp_path / "top.flow").preprocess.alpha == 0.01


def _parses_only_if(accepted: bool, spec: str) -> None:
    """The spec parses if `accepted`, else it is refused with a SpecError."""
    if accepted:
        parse_spec(spec)
    else:
        with pytest.raises(SpecError):
            parse_spec(spec)


@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        ("data npy { test_split 1  shape 1x8x8 }", True),
        ("data npy { test_split 0  shape 1x8x8 }", False),
        ("data npy { test_split 0.5  shape 1x8x8 }", True),
        ("data npy { test_split 0.0  shape 1x8x8 }", False),
        ("data npy { test_split 1.0  shape 1x8x8 }", False),
        ("data npy { shape 1x2x2 }", True),
        ("data npy { shape 0x8x8 }", False),
        ("data npy { shape 1x0x8 }", False),
        ("data npy { shape 4x8192x8192 }", True),  # 2**28 values: the most an image may have
        ("data npy { shape 8x8192x8192 }", False),
        ("data npy { shape 1x65536x2 }", True),
        ("data npy { shape 1x65537x2 }", False),
        ("data cifar10 { classes 9 }", True),
        ("data cifar10 { classes 10 }", False),
        ("data cifar10 { classes () }", False),
        ("data npy { levels 2 }", True),
        ("data npy { levels 1 }", False),
        ("data npy { levels 65536 }", True),
        ("data npy { levels 65537 }", False),
        ("preprocess logit(alpha=0.4999)", True),
        ("preprocess logit(alpha=0.5)", False),
        ("preprocess logit(alpha=0.0)", False),
        ("target_params 0", True),
        ("target_params -1", False),
    ],
)
def test_data_and_section_settings_are_accepted_at_their_bounds_and_refused_past_them(text, accepted):
    _parses_only_if(accepted, FLOW + text + "\n")


@pytest.mark.parametrize(
    ("train", "accepted"),
    [
        ("optimizer adam(lr=1e-3)  warmup 0 steps, then exponential(floor=1e-3)", True),  # floor = lr
        ("optimizer adam(lr=1e-3)  warmup 0 steps, then exponential(floor=1.1e-3)", False),
        ("warmup 10 steps, then constant, then warmup(at=11, steps=5, lr=1e-4)", True),
        ("warmup 10 steps, then constant, then warmup(at=10, steps=5, lr=1e-4)", False),
        ("length 100 steps  warmup 0 steps, then constant, then warmup(at=99, steps=0, lr=1e-4)", True),
        ("length 100 steps  warmup 0 steps, then constant, then warmup(at=100, steps=5, lr=1e-4)", False),
        ("warmup 0 steps, then constant, then warmup(at=5, steps=-1, lr=1e-4)", False),
        ("optimizer adam(betas=(0.0, 0.999))", True),
        ("optimizer adam(betas=(0.9, 1.0))", False),
        ("optimizer adam(betas=(-0.1, 0.999))", False),
        ("optimizer adam(lr=10.0)", True),
        ("optimizer adam(lr=10.5)", False),
        ("optimizer adam(lr=0.0)", False),
        ("optimizer adam(eps=1.0)", True),
        ("optimizer adam(eps=1.5)", False),
        ("optimizer adam(weight_decay=0.0)", True),
        ("optimizer adam(weight_decay=-0.1)", False),
        ("warmup 0 steps, then step(every=1, gamma=1.0)", True),
        ("warmup 0 steps, then step(every=0, gamma=0.5)", False),
        ("warmup 0 steps, then step(every=10, gamma=1.01)", False),
        ("warmup 0 steps, then exponential(decay=1.0, hold=0)", True),
        ("warmup 0 steps, then exponential(decay=1.01)", False),
        ("warmup 0 steps, then exponential(hold=-1)", False),
        ("batch 12  accumulate 3", True),
        ("batch 12  accumulate 5", False),
        ("init_batch 2", True),
        ("init_batch 1", False),
        ("seed 4294967295", True),
        ("seed 4294967296", False),
        ("length 1 step  eval every 1 step  save every 1 step", True),
        ("length 0 steps", False),
        ("save every 0 steps", False),
        ("clip_grad_norm 0.0", False),
    ],
)
def test_train_settings_are_accepted_at_their_bounds_and_refused_past_them(train, accepted):
    _parses_only_if(accepted, TRAIN % train)


@pytest.mark.parametrize(
    ("setting", "accepted"),
    [
        ("temperatures (10.0, 0.01)", True),
        ("temperatures 0.0", False),
        ("temperatures 10.5", False),
        ("temperatures ()", False),
        ("samples 0", True),
        ("samples 4096", True),
        ("samples 4097", False),
        ("images 1  batch 1", True),
        ("images 0", False),
        ("batch 0", False),
    ],
)
def test_eval_settings_are_accepted_at_their_bounds_and_refused_past_them(setting, accepted):
    _parses_only_if(accepted, FLOW + f"eval {{ {setting} }}\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "model m\nflow { split stripe { coupling(filters=8, filters=0); flip } }\n",
            "<string>:2:43: duplicate setting 'filters' (first set at column 32)",
        ),
        (
            "model m\ndefaults { coupling(filters=8)  coupling(filters=0) }\n" + FLOW.split("\n")[1],
            "<string>:2:33: duplicate 'coupling' in defaults (first set at line 2)",
        ),
        (
            FLOW + "flow { split stripe { coupling(filters=0); flip } }\n",
            "<string>:3:1: duplicate section 'flow'",
        ),
        (FLOW + "train { batch 8  batch 0 }\n", "<string>:3:18: duplicate setting 'batch' in train"),
        (
            FLOW + "train { eval every 1 epoch  eval every 0 epochs }\n",
            "<string>:3:29: duplicate setting 'eval every'",
        ),
    ],
)
def test_a_duplicate_is_reported_and_dropped_so_its_value_is_never_checked(text, message):
    """The first of two is kept: the second's wrong value gets no message of its own."""
    with pytest.raises(SpecError) as caught:
        parse_spec(text)
    assert len(caught.value.diagnostics) == 1
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "model m\nflow { split stripe { coupling(source=1); flip } }\n",
            "<string>:2:32: unknown setting 'source' of coupling",
        ),
        (
            "model m\nflow { split stripe { coupling(kind=affine); flip } }\n",
            "unknown setting 'kind' of coupling",
        ),
        (FLOW + "preprocess logit(kind=x)\n", "<string>:3:18: unknown setting 'kind' of preprocess"),
    ],
)
def test_the_words_kind_and_source_are_no_settings_of_a_step_or_preprocess(text, message):
    assert message in error_of(text)


def test_the_kind_of_the_defaults_coupling_is_set_as_kind_or_as_coupling():
    """`--set defaults.coupling.kind=affine` as the kind word of `coupling affine` (`inspect` shows it so)."""
    for key in ("kind", "coupling"):
        spec = parse_spec(FLOW, overrides=(f"defaults.coupling.{key}=affine",))
        assert spec.defaults.coupling.coupling == "affine" and spec.flow[0].body[0].coupling == "affine"


def test_show_writes_a_single_class_named_all_quoted():
    """`classes all` means every class: a folder's one class named "all" stays a name through `show`."""
    text = 'model m\ndata folder { path "x"  shape 3x8x8  classes "all"  test_split 5 }\nflow { squeeze }\n'
    spec = parse_spec(text)
    shown = format_spec(spec)
    assert spec.data.classes == ("all",) and 'classes "all"' in shown and parse_spec(shown) == spec


def test_show_writes_exponents_and_units_as_a_person_would():
    """`1e-5`, not Python's `1e-05`; `1 epoch` and `1 step`, not `1 epochs`."""
    overrides = ("train.lr=1e-5", "train.eps=1e-10", "train.length=1 step", "train.save=1 epoch")
    shown = format_spec(parse_spec(FLOW, overrides=overrides))
    assert "optimizer adam(lr=1e-5, betas=(0.9, 0.999), eps=1e-10)" in shown
    assert "\n  length 1 step\n  eval every 1 epoch\n  save every 1 epoch\n" in shown
    assert "warmup 1 step," in format_spec(parse_spec(TRAIN % "warmup 1 step"))


def test_show_keeps_a_block_of_exactly_100_columns_on_one_line():
    """A step with a body is written on one line while it fits in 100 columns, the limit included."""
    flips = "; ".join(["flip"] * 7)
    for filters, lines in ((16, 1), (160, 10)):
        coupling = f"coupling(filters={filters}, blocks=2, heads=2)"
        text = f"model m\nflow {{ split stripe {{ {coupling}; {flips} }} }}\n"
        shown = format_spec(parse_spec(text))
        flow = shown.split("flow {\n")[1].split("\n}\n")[0].split("\n")
        assert len(flow) == lines and max(map(len, flow)) == (100 if lines == 1 else 44)


def test_a_sigmoid_in_a_split_gets_one_message():
    """The shape check refuses it; the rule for sigmoids outside splits does not say so a second time."""
    with pytest.raises(SpecError) as caught:
        parse_spec("model m\ndata npy { shape 1x8x8 }\nflow { split stripe { coupling; sigmoid } }\n")
    assert [f"{d.loc}: {d.message}" for d in caught.value.diagnostics] == [
        "<string>:3:33: sigmoid cannot run inside a split"
    ]


def test_the_dequantizers_splits_must_share_one_mask_also_when_there_are_two():
    deq = "dequantize variational { split stripe { coupling; flip } split checkerboard { coupling } sigmoid }"
    message = error_of(f"model m\ndata npy {{ shape 1x8x8 }}\nflow {{ squeeze }}\n{deq}\n")
    assert message.startswith("<string>:4:26: all splits of the dequantizer must use one mask")
    assert "got checkerboard, stripe" in message


def test_a_set_that_breaks_a_rule_for_files_is_refused_on_a_stored_spec_too():
    """A stored spec is spared the rules for files made after it, not a `--set` that breaks one."""
    text = FLOW.replace("model m", "model old") + "train { init_batch 1 }\n"
    assert parse_spec(text, stored=True).train.init_batch == 1
    message = error_of(FLOW.replace("model m", "model old"), ("train.init_batch=1",))
    assert message.startswith("--set:1:") and "init_batch must be >= 2" in message
    with pytest.raises(SpecError, match=r"--set:1:\d+: init_batch must be >= 2"):
        parse_spec(FLOW, overrides=("train.init_batch=1",), stored=True)


def test_a_stored_spec_with_an_empty_path_keeps_it_through_show():
    """An older checkpoint's spec may hold `path ""` (files may not since): `show` writes it, so that the
    stored spec with `--set` overrides (`stored_with_overrides`) still reads its data from there."""
    spec = parse_spec('model m\ndata npy { path ""  shape 1x8x8 }\nflow { squeeze }\n', stored=True)
    assert spec.data.path == "" and 'path ""' in format_spec(spec)
    assert parse_spec(format_spec(spec), stored=True) == spec


def test_one_step_and_one_epoch_are_read_in_their_units():
    train = parse_spec(TRAIN % "length 1 step  eval every 1 epoch  save every 1 step").train
    assert (train.length.unit, train.eval_every.unit, train.save_every.unit) == ("steps", "epochs", "steps")
    over = parse_spec(FLOW, overrides=("train.length=1 epoch", "train.eval=1 step")).train
    assert (over.length.unit, over.eval_every.unit) == ("epochs", "steps")


def test_augment_takes_on_and_off_as_hflip_and_none():
    for word, hflip in (("on", True), ("off", False), ("hflip", True), ("none", False)):
        assert parse_spec(TRAIN % f"augment {word}").train.hflip is hflip
        assert parse_spec(FLOW, overrides=(f"train.augment={word}",)).train.hflip is hflip


def test_a_split_or_repeat_with_an_empty_body_is_read_and_shown():
    spec = parse_spec("model m\ndata npy { shape 1x8x8 }\nflow { split stripe { } repeat 2 { } squeeze }\n")
    assert [step.body for step in spec.flow[:2]] == [[], []]
    assert parse_spec(format_spec(spec)) == spec


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("data cifar10 { classes () }", "<string>:3:16: classes must name at least one class"),
        ("eval { temperatures () }", "<string>:3:8: temperatures needs at least one value"),
        (
            "train { optimizer adam(betas=()) }",
            "<string>:3:9: betas are two values, e.g. (0.9, 0.999), got ()",
        ),
    ],
)
def test_an_empty_list_is_read_as_empty_and_refused_for_what_it_is(setting, message):
    assert error_of(FLOW + setting + "\n").startswith(message)


@pytest.mark.parametrize("end", ["\r\n", "\r"])
def test_parse_spec_counts_windows_and_old_mac_lines(end):
    """Text handed to `parse_spec` (not read from a file) has its line ends read as a file's are."""
    text = FLOW.replace("\n", end) + "train { batch 0 }" + end
    assert error_of(text).startswith("<string>:3:9: batch must be >= 1, got 0")
