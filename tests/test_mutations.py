"""Mutated shipped specs end in a valid spec or a clean `SpecError`, never in any other exception.

Mutations: delete, duplicate or swap characters, tokens and lines; replace numbers. A mutant that is
still valid must also survive the canonical formatter (it parses back to an equal spec). Random
`--set` overrides of the shipped specs must end the same way.
FLOWSPEC_MUTATIONS=N raises the number of examples per spec (default 60) for a longer local hunt.
"""

from __future__ import annotations

import os
import re

import pytest
from conftest import ALL_SPECS, ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowspec import load_spec, parse_spec
from flowspec.diagnostics import SpecError
from flowspec.formatter import format_spec

EXAMPLES = int(os.environ.get("FLOWSPEC_MUTATIONS", "60"))
TOKEN = re.compile(r"\w+|\S")
NUMBER = re.compile(r"\d[\d_.eE+-]*")
NUMBERS = st.one_of(
    st.sampled_from(
        ["0", "-1", "1", "2", "3", "7", "1.5", "0.5", "1e-3", "1e9", "99999999999", "4096", "1_0"]
    ),
    st.integers(-5, 300).map(str),
)


def _spans(text: str, unit: str) -> list[tuple[int, int]]:
    if unit == "char":
        return [(i, i + 1) for i in range(len(text))]
    if unit == "token":
        return [m.span() for m in TOKEN.finditer(text)]
    if unit == "number":
        return [m.span() for m in NUMBER.finditer(text)]
    spans, start = [], 0
    for line in text.splitlines(keepends=True):
        spans.append((start, start + len(line)))
        start += len(line)
    return spans


@st.composite
def mutants(draw, text: str) -> str:
    for _ in range(draw(st.integers(1, 3))):
        unit = draw(st.sampled_from(["char", "token", "line", "number"]))
        spans = _spans(text, unit)
        if len(spans) < 2:
            continue
        i = draw(st.integers(0, len(spans) - 2))
        (a, b), (c, d) = spans[i], spans[i + 1]
        if unit == "number":
            text = text[:a] + draw(NUMBERS) + text[b:]
            continue
        op = draw(st.sampled_from(["delete", "duplicate", "swap"]))
        if op == "delete":
            text = text[:a] + text[b:]
        elif op == "duplicate":
            text = text[:b] + (" " if unit == "token" else "") + text[a:b] + text[b:]
        else:
            text = text[:a] + text[c:d] + text[b:c] + text[a:b] + text[d:]
    return text


@pytest.mark.parametrize("path", ALL_SPECS, ids=lambda p: str(p.relative_to(ROOT / "specs")))
def test_mutants_end_in_a_spec_or_a_clean_error(path):
    original = path.read_text()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=EXAMPLES <= 60,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(mutants(original))
    def check(text: str) -> None:
        try:
            spec = parse_spec(text, source=str(path))
        except SpecError as error:
            message = str(error)
            assert message and error.diagnostics
            for diagnostic in error.diagnostics:
                assert diagnostic.message
                if diagnostic.loc is not None:
                    assert diagnostic.loc.line >= 1 and diagnostic.loc.col >= 1
            return
        assert parse_spec(format_spec(spec)) == spec

    check()


OVERRIDE_KEYS = [
    "model", "target_params", "prior", "dequantize", "dequantize.context.filters", "dequantize.steps.0.mask",
    "data", "data.shape", "data.classes", "data.levels", "preprocess.alpha", "defaults.norm",
    "defaults.coupling", "defaults.coupling.kind", "defaults.coupling.heads", "train.length", "train.eval",
    "train.optimizer", "train.schedule", "train.betas", "train.augment", "flow", "flow.0",
    "flow.0.body.0.count", "flow.0.body.0.body.2.filters", "flow.9.mask", "flow.0.kind", "source", "",
    "train..lr",
]  # fmt: skip
OVERRIDE_VALUES = [
    "", "1", "-1", "0", "1e-3", "off", "uniform", "variational", "dog", "(dog, cat)", "()", "(1,",
    "100 steps", "3 epochs", "3x8x8", '"x"', "adam(lr=1)", "step(every=3)", "foo(bar=1)", "=", "{", "1 2",
    "((1))",
]  # fmt: skip


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 60)
@given(
    st.lists(
        st.tuples(st.sampled_from(OVERRIDE_KEYS), st.sampled_from(OVERRIDE_VALUES)).map("=".join), max_size=3
    ),
    st.sampled_from(ALL_SPECS),
)
def test_random_overrides_end_in_a_spec_or_a_clean_error(overrides, path):
    try:
        load_spec(path, overrides)
    except SpecError as error:
        assert str(error) and error.diagnostics
