"""Evaluation during training: the `eval` settings, their cost limits, the order of checkpoint and
evaluation, progress, and stop signals during evaluation and sampling."""

from __future__ import annotations

import pytest

from flowspec.diagnostics import SpecError
from flowspec.formatter import format_spec
from flowspec.loader import parse_spec
from flowspec.spec import EvalSpec

TINY = """\
model tiny
data digits { shape 1x8x8  levels 17 }
flow { split checkerboard { coupling affine(filters=4, blocks=1); flip } }
"""


# ---------------------------------------------------------------- the `eval` section


def test_eval_section_reads_formats_and_overrides():
    spec = parse_spec(TINY + "eval { images 64  samples 16  temperatures 1.0  inversion off }")
    assert spec.eval == EvalSpec(images=64, samples=16, temperatures=(1.0,), inversion=False)
    assert parse_spec(TINY).eval == EvalSpec()  # all images, the train batch, 2 grids of 64, inversion on
    assert "eval {" not in format_spec(parse_spec(TINY))
    text = format_spec(spec)
    assert "eval { images 64  samples 16  temperatures (1.0)  inversion off }" in text
    assert parse_spec(text) == spec
    changed = parse_spec(TINY, overrides=["eval.batch=8", "eval.images=all", "eval.temperatures=(0.7, 1)"])
    assert changed.eval == EvalSpec(batch=8, temperatures=(0.7, 1.0))


def test_eval_section_merges_over_an_extended_spec(tmp_path):
    base = tmp_path / "base.flow"
    base.write_text(TINY + "eval { images 100  samples 4 }\n")
    child = f'extends "{base.name}"\nmodel child\neval {{ samples 9 }}\n'
    spec = parse_spec(child, source=str(tmp_path / "child.flow"))
    assert (spec.eval.images, spec.eval.samples) == (100, 9)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("eval { images 0 }", "images must be >= 1, got 0"),
        ("eval { imagse 3 }", "did you mean 'images'"),
        ("eval { temperatures (0.5, 0) }", "temperatures must lie in (0, 10]"),
        ("eval { temperatures () }", "temperatures needs at least one value"),
        ("eval { inversion maybe }", "inversion must be on or off"),
        ("eval { samples 3  samples 4 }", "duplicate setting 'samples' in eval"),
    ],
)
def test_eval_section_mistakes_name_the_place(text, message):
    with pytest.raises(SpecError) as error:
        parse_spec(TINY + text, source="e.flow")
    assert message in str(error.value) and "e.flow:4:" in str(error.value)
