"""The step kinds: every kind is one complete definition, the grammar and the registry agree, and the
one walk over a step tree reports shapes and issues the way every stage reads them."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import pytest

import flowspec
from flowspec.formatter import format_spec
from flowspec.inspection.unroll import unrolled_steps
from flowspec.nodes import StepNode
from flowspec.parser import _lark, _literal
from flowspec.spec import FlowSpec
from flowspec.steps import KINDS, walk, written
from flowspec.steps.coupling import CouplingStep
from flowspec.steps.factor_out import FactorOutStep
from flowspec.steps.flip import FlipStep
from flowspec.steps.kind import StepKind, no_cost, no_label, register, same_state
from flowspec.steps.norm import NormStep
from flowspec.steps.repeat import RepeatStep
from flowspec.steps.split import SplitStep
from flowspec.steps.squeeze import SqueezeStep


def _grammar_rules() -> dict[str, list[list[str]]]:
    rules: dict[str, list[list[str]]] = {}
    for rule in _lark().rules:
        rules.setdefault(str(rule.origin.name), []).append([str(s.name) for s in rule.expansion])
    return rules


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_kind_has_every_part(name: str):
    kind = KINDS[name]
    assert kind.name == name
    assert issubclass(kind.settings, StepNode)
    fields = kind.settings.model_fields
    assert fields["kind"].default == name and "source" in fields
    for rule in (kind.shape, kind.build, kind.label, kind.flops, kind.memory):
        assert callable(rule)
    assert set(kind.positional) <= set(fields) and set(kind.shaped) <= set(fields)
    assert ("body" in fields) == kind.body
    assert kind.copies is None or kind.body  # only a step with a body copies it


def test_grammar_step_rules_and_kinds_agree():
    rules = _grammar_rules()
    step_rules = {expansion[0] for expansion in rules["_step"]}
    assert step_rules == set(KINDS)
    for name, kind in KINDS.items():
        symbols = {s for expansion in rules[name] for s in expansion}
        assert ("_steps" in symbols) == kind.body, name
        # a rule's children: its positional settings (anything but keywords), then `args`, then its body
        positional = [
            [s for s in e if s not in ("args", "_steps") and _literal(s) is None] for e in rules[name]
        ]
        assert max(map(len, positional)) == len(kind.positional), name


def test_walk_states_and_unrolled_copies():
    steps = [
        RepeatStep(count=2, body=[SqueezeStep()]),
        SplitStep(mask="channel", body=[RepeatStep(count=3, body=[CouplingStep(), FlipStep()])]),
        FactorOutStep(),
    ]
    once = walk(steps, (3, 8, 8))
    assert not once.issues and once.final == (24, 2, 2)
    repeat, split, factor = once.runs
    assert (repeat.state_in, repeat.state_out) == ((3, 8, 8), (48, 2, 2))
    assert split.body[0].body[0].state_in == ((24, 2, 2), (24, 2, 2))
    assert factor.latent == [(24, 2, 2)]
    assert [r.path for r in once.all()].count("flow.1.body.0.body.0") == 1  # one run per written step
    copies = [r.copy for r in walk(steps, (3, 8, 8), unroll=True).all() if r.path == "flow.1.body.0.body.0"]
    assert copies == [0, 1, 2]
    assert [path for path, _ in written(steps)][:3] == ["0", "0.body.0", "1"]


def test_the_unrolled_step_count_is_what_the_kinds_say(monkeypatch):
    """The limit on unrolled steps counts each kind as the builder unrolls it: a step that copies its body
    (a repeat) counts its copies' layers, one that holds its body once (a split) itself and its body."""
    steps = [
        RepeatStep(count=3, body=[SplitStep(mask="stripe", body=[FlipStep(), FlipStep()])]),
        SqueezeStep(),
    ]
    layers = [r for r in walk(steps, (2, 4, 4), unroll=True).all() if r.kind.copies is None]
    assert unrolled_steps(steps) == len(layers) == 3 * 3 + 1
    monkeypatch.setitem(KINDS, "repeat", replace(KINDS["repeat"], copies=lambda step: 2 * step.count))
    assert unrolled_steps(steps) == 6 * 3 + 1


def test_walk_reports_each_step_that_cannot_run():
    steps = [
        CouplingStep(),
        SplitStep(mask="stripe", body=[SplitStep(mask="channel", body=[])]),
        SqueezeStep(),
    ]
    issues = walk(steps, (3, 6, 5), "dequantize").issues
    assert [(i.path, i.message) for i in issues] == [
        ("dequantize.0", "coupling needs two halves: put it inside a split"),
        ("dequantize.1", "the stripe mask needs an even width, got width 5 (3x6x5)"),
        ("dequantize.2", "squeeze is not allowed in the dequantizer"),
    ]
    nested = walk(
        [SplitStep(mask="channel", body=[NormStep(), SplitStep(mask="channel", body=[])])], (2, 2, 2)
    )
    assert [i.message for i in nested.issues] == ["a split cannot be nested inside another split"]


def test_walk_stops_after_a_step_that_should_have_changed_the_shape():
    """What follows a failed squeeze or factor_out gets a shape nobody knows: its problems are echoes."""
    steps = [
        SqueezeStep(),
        SplitStep(mask="channel", body=[CouplingStep()]),
        FactorOutStep(),
        FactorOutStep(),
    ]
    issues = walk(steps, (1, 8, 7)).issues
    assert [i.message for i in issues] == ["squeeze needs an even height and width, got 1x8x7"]
    issues = walk(steps[2:], (1, 8, 8)).issues
    assert [i.message for i in issues] == ["factor_out needs an even channel count, got 1x8x8"]


def test_build_refuses_a_spec_whose_shapes_do_not_fit():
    spec = FlowSpec(name="bad", flow=[FlipStep()])  # made in Python: validation alone does not check shapes
    with pytest.raises(
        flowspec.UserError, match="the spec 'bad' does not fit its data shape 3x32x32: .*flip needs"
    ):
        flowspec.build(spec)


class CopyStep(StepNode):
    """A throwaway kind named as a pydantic method (`BaseModel.copy`)."""

    kind: Literal["copy"] = "copy"


@pytest.fixture
def copy_kind():
    """The kind `copy`, registered for one test and unregistered after it."""
    kind = register(
        StepKind("copy", CopyStep, same_state, lambda *a: None, no_label, no_cost, no_cost)  # type: ignore[arg-type]
    )
    yield kind
    del KINDS["copy"]


def test_show_writes_a_kind_named_as_a_pydantic_attribute(copy_kind):
    """`defaults` has no entry `copy`: its `copy` method is no setting of the kind (it was read as one)."""
    spec = flowspec.parse_spec("model m\nflow { split stripe { coupling; flip } }\n")
    spec = spec.model_copy(update={"flow": [*spec.flow, CopyStep()]})
    assert "flow {\n  split stripe { coupling; flip }\n  copy\n}" in format_spec(spec)
